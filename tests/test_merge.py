"""Training-free merges: properties on tiny state dicts and tiny recommenders."""

from __future__ import annotations

import pytest
import torch

from fedmerge.config import load_config
from fedmerge.errors import FedmergeError
from fedmerge.merge import METHODS, check_aligned, merge, method_params, prepare, task_vector
from fedmerge.merge.rows import usage_rows
from fedmerge.merge.vectors import StateDict, combine
from fedmerge.models import build_model
from fedmerge.train.config import ExperimentConfig


def _close(a: StateDict, b: StateDict, atol: float = 1e-6) -> bool:
    return set(a) == set(b) and all(
        torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a
    )


def _tiny_models(n: int = 3) -> tuple[StateDict, list[StateDict]]:
    """A tiny textseq base and n 'fine-tuned' copies (base + seeded noise on float tensors)."""
    config = load_config(
        "textseq",
        [
            "model.encoder=hashing",
            "model.dim=16",
            "model.layers=1",
            "model.experts=2",
            "model.code_tables=2",
            "model.code_bits=4",
        ],
        ExperimentConfig,
    ).model
    base = build_model(config, 64, seed=0).state_dict()
    generator = torch.Generator().manual_seed(1)
    models = [
        {
            k: v + 0.1 * torch.randn(v.shape, generator=generator)
            if v.is_floating_point()
            else v.clone()
            for k, v in base.items()
        }
        for _ in range(n)
    ]
    return base, models


IDENTITY = {
    "average": {},
    "task_arithmetic": {"lam": 1 / 3},
    "ties": {"density": 1.0},
    "model_stock": {},
    "dare": {"p": 0.0, "lam": 1 / 3},
    "magnitude": {"density": 1.0, "lam": 1 / 3},
}


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_merging_identical_models_gives_that_model(name: str) -> None:
    base, models = _tiny_models(1)
    assert _close(merge(base, models * 3, name, IDENTITY[name]), models[0], atol=1e-5)


def test_task_arithmetic_with_lambda_zero_is_the_base() -> None:
    base, models = _tiny_models()
    assert _close(merge(base, models, "task_arithmetic", {"lam": 0.0}), base)
    assert all(
        torch.equal(merge(base, models, "ties", {"lam": 0.0})[k], v) for k, v in base.items()
    )


def test_ties_sign_election_and_disjoint_mean_by_hand() -> None:
    base = {"w": torch.zeros(4)}
    models = [
        {"w": torch.tensor([1.0, -2.0, 3.0, 0.5])},
        {"w": torch.tensor([2.0, 1.0, -1.0, -0.5])},
    ]
    # sums 3, -1, 2, 0 -> signs +, -, +, 0; agreeing entries averaged, the rest dropped
    assert torch.equal(
        merge(base, models, "ties", {"density": 1.0})["w"], torch.tensor([1.5, -2.0, 3.0, 0.0])
    )
    # density 0.5 keeps the two largest of each: [_, -2, 3, _] and [2, 1, _, _]
    assert torch.equal(
        merge(base, models, "ties", {"density": 0.5})["w"], torch.tensor([2.0, -2.0, 3.0, 0.0])
    )


def test_ties_with_density_one_and_agreeing_signs_equals_task_arithmetic() -> None:
    base, models = _tiny_models()
    same_sign = [
        {
            k: base[k] + (m[k] - base[k]).abs() if v.is_floating_point() else v
            for k, v in base.items()
        }
        for m in models
    ]
    assert _close(
        merge(base, same_sign, "ties", {"density": 1.0}),
        merge(base, same_sign, "task_arithmetic", {"lam": 1 / 3}),
    )


def test_trimming_is_global_or_per_tensor() -> None:
    vector = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    glob = prepare("magnitude", [vector], {"density": 0.5, "scope": "global", "lam": 1.0}).vectors[
        0
    ]
    per = prepare("magnitude", [vector], {"density": 0.5, "scope": "tensor", "lam": 1.0}).vectors[0]
    assert torch.equal(glob["a"], vector["a"]) and not glob["b"].any()
    assert torch.equal(per["a"], torch.tensor([10.0, 9.0, 0, 0])) and torch.equal(
        per["b"], torch.tensor([0, 0, 3.0, 4.0])
    )


def test_dare_with_p_zero_is_its_base_method_and_rescales_what_it_keeps() -> None:
    base, models = _tiny_models()
    assert _close(
        merge(base, models, "dare", {"p": 0.0, "lam": 0.3}),
        merge(base, models, "task_arithmetic", {"lam": 0.3}),
    )
    assert _close(
        merge(base, models, "dare", {"p": 0.0, "then": "ties", "density": 0.2, "lam": 1.0}),
        merge(base, models, "ties", {"density": 0.2}),
    )
    tau = {"w": torch.ones(100_000)}
    kept = prepare("dare", [tau], {"p": 0.7, "seed": 3}).vectors[0]["w"]
    assert kept.unique().tolist() == pytest.approx([0.0, 1 / 0.3])
    assert abs((kept == 0).float().mean().item() - 0.7) < 0.01
    # seeded
    assert torch.equal(kept, prepare("dare", [tau], {"p": 0.7, "seed": 3}).vectors[0]["w"])


def test_breadcrumbs_drops_outliers_and_small_entries() -> None:
    tau = {"w": torch.arange(1.0, 101.0)}
    kept = prepare("breadcrumbs", [tau], {"density": 0.5, "gamma": 0.1}).vectors[0]["w"]
    assert torch.equal(kept.nonzero().squeeze(1), torch.arange(40, 90))  # values 41..90 survive


def test_every_method_keeps_integer_buffers_and_shapes() -> None:
    base, models = _tiny_models()
    for name in METHODS:
        merged = merge(base, models, name)
        assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
        assert all(torch.equal(merged[k], v) for k, v in base.items() if not v.is_floating_point())


def test_bad_models_and_params_are_named() -> None:
    base, models = _tiny_models()
    bad = dict(models[0], positions=torch.zeros(3, 3))
    with pytest.raises(FedmergeError, match="beauty: tensor 'positions' has shape"):
        check_aligned(base, [models[1], bad], ["books", "beauty"])
    broken = {k: v.clone() for k, v in models[0].items()}
    broken["positions"][0, 0] = float("nan")
    with pytest.raises(FedmergeError, match="movies: tensor 'positions' holds NaN"):
        check_aligned(base, [broken], ["movies"])
    with pytest.raises(FedmergeError, match="lacks tensor"):
        check_aligned(base, [{k: v for k, v in models[0].items() if k != "positions"}])
    with pytest.raises(FedmergeError, match="unknown merge method 'mean'.*ties"):
        method_params("mean")
    with pytest.raises(FedmergeError, match="'method.densty' is not a known key"):
        method_params("ties", {"densty": 0.2})
    with pytest.raises(FedmergeError, match="'method.density'"):
        method_params("ties", {"density": 1.5})
    assert task_vector(base, base)["positions"].abs().sum() == 0


def _usage() -> tuple[StateDict, list[StateDict], dict[str, torch.Tensor]]:
    """Three models whose 4-row table 'rows' is read (4 reads per domain).

    Row 0 by model 0 only, row 1 by models 0 and 1 (fractions 1/4 and 3/4), row 2 by all three (1/4,
    1/4, 1), row 3 by none.
    """
    base = {"rows": torch.zeros(4, 2), "other": torch.zeros(3)}
    models = [
        {"rows": torch.full((4, 2), float(k + 1)), "other": torch.full((3,), float(k + 1))}
        for k in range(3)
    ]
    usage = {"rows": torch.tensor([[2, 1, 1, 0], [0, 3, 1, 0], [0, 0, 4, 0]])}
    return base, models, usage


def _usage_merge(
    base: StateDict,
    name: str,
    vectors: list[StateDict],
    usage: dict[str, torch.Tensor],
    params: dict | None = None,
) -> StateDict:
    prepared = usage_rows(prepare(name, vectors, params), vectors, usage)
    return combine(base, prepared.vectors, prepared.weights)


@pytest.mark.parametrize(
    ("name", "params"), [("average", {}), ("task_arithmetic", {"lam": 0.3}), ("ties", {})]
)
def test_usage_rows_by_hand(name: str, params: dict) -> None:
    base, models, usage = _usage()
    vectors = [task_vector(base, m) for m in models]
    prepared = prepare(name, vectors, params)
    merged = _usage_merge(base, name, vectors, usage, params)
    method = combine(base, prepared.vectors, prepared.weights)
    expected = torch.tensor([1.0, (1 * 1 + 3 * 2) / 4, (1 * 1 + 1 * 2 + 4 * 3) / 6])
    torch.testing.assert_close(merged["rows"][:3], expected[:, None].expand(3, 2))
    # read by no domain: the method's value
    torch.testing.assert_close(merged["rows"][3], method["rows"][3])
    # other tensors: the method's merge
    torch.testing.assert_close(merged["other"], method["other"])
    # a 10x larger catalogue, same fractions
    bigger = {"rows": usage["rows"] * torch.tensor([[10], [1], [1]])}
    torch.testing.assert_close(
        _usage_merge(base, name, vectors, bigger, params)["rows"], merged["rows"]
    )


def test_usage_rows_keep_identity_and_lambda_zero() -> None:
    base, models, usage = _usage()
    twins = [task_vector(base, models[1])] * 3
    merged = _usage_merge(base, "average", twins, usage)
    torch.testing.assert_close(merged["rows"][:3], models[1]["rows"][:3])
    vectors = [task_vector(base, m) for m in models]
    zero = _usage_merge(base, "task_arithmetic", vectors, usage, {"lam": 0.0})
    assert _close(zero, base)


def test_textseq_row_usage_counts_the_rows_items_read() -> None:
    config = load_config(
        "textseq",
        [
            "model.encoder=hashing",
            "model.dim=16",
            "model.layers=1",
            "model.experts=2",
            "model.code_tables=3",
            "model.code_bits=4",
        ],
        ExperimentConfig,
    ).model
    model = build_model(config, 64, seed=0)
    features = torch.nn.functional.normalize(
        torch.randn(50, 64, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    counts = model.row_usage(features)["codes.rows.weight"]
    assert counts.shape == (3 * 16,) and counts.sum() == 50 * 3
    # each item reads one row per table
    assert all(counts[t * 16 : (t + 1) * 16].sum() == 50 for t in range(3))
    codes = model.codes.codes(features)
    assert counts[codes[7, 1]] >= 1 and set(model.row_usage(features)) == {"codes.rows.weight"}
