"""Configs, the text-based recommender, training, checkpoints.

On tiny synthetic domains, with hashing features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmerge.config import load_config
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.evaluate.popularity import popularity_scorer
from fedmerge.models import Part, build_model, load_parts
from fedmerge.protocol import FederationConfig
from fedmerge.train.checkpoint import load_checkpoint, load_weights, save_weights
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.loop import fit
from fedmerge.train.run import pretrain_config, train_run
from tests.test_cli import run_cli

TINY = [
    "model.encoder=hashing",
    "model.dim=32",
    "model.heads=2",
    "model.layers=1",
    "model.experts=2",
    "train.batch_size=32",
    "train.warmup_steps=5",
    "train.lr=3e-3",
    "train.patience=20",
]


def tiny(*extra: str) -> ExperimentConfig:
    return load_config("textseq", TINY + list(extra), ExperimentConfig)


def test_config_preset_overrides_and_errors() -> None:
    config = load_config(
        "textseq", ["train.lr=5e-4", "model.dim=64", "train.max_minutes=2.5"], ExperimentConfig
    )
    assert (
        config.train.lr,
        config.model.dim,
        config.train.max_minutes,
        config.model.temperature,
    ) == (5e-4, 64, 2.5, 0.05)
    with pytest.raises(FedmergeError, match="config key 'train.lrate' is not a known key"):
        load_config("textseq", ["train.lrate=1"], ExperimentConfig)
    with pytest.raises(FedmergeError, match="config key 'model.dim'.*got 'big'"):
        load_config(None, ["model.dim=big"], ExperimentConfig)
    with pytest.raises(FedmergeError, match="config key 'model.dropout'"):
        load_config(None, ["model.dropout=1.5"], ExperimentConfig)
    with pytest.raises(FedmergeError, match="not key=value"):
        load_config(None, ["train.lr"], ExperimentConfig)
    presets = (
        "llm-lora, simulate, simulate-demo, simulate-llm, simulate-mergerec, simulate-paper, "
        "textenc, textseq"
    )
    with pytest.raises(FedmergeError, match=f"cannot read config nonexistent .*{presets}"):
        load_config("nonexistent", None, ExperimentConfig)


def test_untrained_model_scores_by_text_similarity() -> None:
    model = build_model(tiny().model, width=64, seed=0).eval()
    features = torch.nn.functional.normalize(torch.randn(30, 64), dim=-1)
    items = model.item_vectors(features)
    users = model.user_vectors(items, torch.tensor([[4, 9, 2, -1], [7, -1, -1, -1]]))
    np.testing.assert_allclose((users * items[[2, 7]]).sum(1).detach(), [1.0, 1.0], atol=1e-5)
    histories = torch.tensor([[4, 9, 2, -1], [7, -1, -1, -1]])
    np.testing.assert_allclose(
        model.scores(features, items, histories).detach(), (users @ items.T).detach(), atol=1e-6
    )
    model.text_weight.fill_(0.5)  # fused raw text cosine to the last item
    fused = model.scores(features, items, histories).detach()
    np.testing.assert_allclose(
        fused - users.detach() @ items.detach().T, 0.5 * features[[2, 7]] @ features.T, atol=1e-5
    )


def test_text_codes_hash_similar_texts_alike_and_start_at_zero() -> None:
    model = build_model(tiny().model, width=64, seed=0)
    draw = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(1, 64, generator=draw), dim=-1)
    near, far = base + 0.01 * torch.randn(1, 64, generator=draw), torch.randn(1, 64, generator=draw)
    bits = [torch.einsum("nt,ktb->nkb", x, model.codes.planes) > 0 for x in (base, near, far)]
    assert (bits[0] == bits[1]).float().mean() > 0.95 and (bits[0] == bits[2]).float().mean() < 0.8
    assert not model.codes.rows.weight.any()
    assert torch.equal(build_model(tiny().model, 64, seed=0).codes.planes, model.codes.planes)


def test_every_domain_gets_the_same_layout_and_base() -> None:
    config = tiny()
    parts = load_parts(["synth-0", "synth-1"], tiny().model, quiet=True)
    # same size here, but no table depends on it
    assert parts[0].domain.n_items == parts[1].domain.n_items
    a, b = (build_model(config.model, p.features.shape[1], seed=3) for p in parts)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(
        build_model(config.model, 64, seed=4).adaptor.projections, a.adaptor.projections
    )


def test_training_lowers_loss_and_beats_popularity_and_base(tmp_path: Path, cache: Path) -> None:
    rows = train_run(["synth-0"], tiny("train.epochs=12"), tmp_path / "run", quiet=True)
    facts = json.loads((tmp_path / "run" / "config.json").read_text())
    losses = [h["loss"] for h in facts["history"] if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]
    test = {r["model"]: r for r in rows if r["split"] == "test"}
    popularity = evaluate_domain(popularity_scorer, synthetic_domain("synth-0"), "test")
    assert test["textseq"]["recall@10"] > 2 * popularity["recall@10"]
    assert test["textseq"]["recall@10"] > 1.2 * test["base"]["recall@10"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "base.safetensors",
        "config.json",
        "metrics.csv",
        "metrics.json",
        "model.safetensors",
        "run.json",
    ]
    assert not (tmp_path / "run.partial").exists()


def test_checkpoint_round_trip_gives_identical_scores(tmp_path: Path, cache: Path) -> None:
    train_run(["synth-1"], tiny("train.epochs=2"), tmp_path / "run", quiet=True)
    model, config, meta = load_checkpoint(tmp_path / "run")
    part = load_parts(["synth-1"], config.model, quiet=True)[0]
    again = evaluate_domain(model_scorer(model, part.features), part.domain, "test")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    row = next(r for r in written if r["model"] == "textseq" and r["split"] == "test")
    assert again["recall@10"] == row["recall@10"] and again["ndcg@10"] == row["ndcg@10"]
    assert meta["domains"] == ["synth-1"] and meta["best_epoch"] >= 0


def test_same_seed_same_metrics_and_resume_matches(tmp_path: Path, cache: Path) -> None:
    part = load_parts(["synth-2"], tiny().model, quiet=True)[0]
    config = tiny("train.epochs=4")

    def run(epochs: int, state: Path | None = None) -> dict[str, torch.Tensor]:
        model = build_model(config.model, part.features.shape[1], seed=0)
        fit(
            model,
            [part],
            config.train.model_copy(update={"epochs": epochs}),
            state_dir=state,
            quiet=True,
        )
        return model.state_dict()

    first, second = run(4), run(4)
    assert all(torch.equal(first[k], second[k]) for k in first)
    state = tmp_path / "state"
    state.mkdir()
    run(2, state)  # interrupted after two epochs ...
    resumed = run(4, state)  # ... and resumed to four
    assert all(torch.allclose(first[k], resumed[k], atol=1e-6) for k in first)


def test_bad_checkpoints_are_named(tmp_path: Path) -> None:
    small = build_model(tiny().model, 64, seed=0)
    save_weights(small, tmp_path / "small.safetensors")
    big = build_model(tiny("model.dim=48").model, 64, seed=0)
    with pytest.raises(
        FedmergeError,
        match=r"tensor 'positions' has shape \(50, 32\), the model expects \(50, 48\)",
    ):
        load_weights(big, tmp_path / "small.safetensors")
    deeper = build_model(tiny("model.layers=2").model, 64, seed=0)
    with pytest.raises(FedmergeError, match="lacks tensor 'blocks.layers.1"):
        load_weights(deeper, tmp_path / "small.safetensors")
    with torch.no_grad():
        small.positions[0, 0] = float("nan")
    # as a foreign tool would write it
    save_file(small.state_dict(), str(tmp_path / "nan.safetensors"))
    with pytest.raises(FedmergeError, match="NaN"):
        load_weights(build_model(tiny().model, 64, seed=0), tmp_path / "nan.safetensors")
    with pytest.raises(FedmergeError, match="not a fedmerge checkpoint"):
        load_checkpoint(tmp_path)


def test_nan_loss_stops_training(cache: Path) -> None:
    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    broken = Part(part.domain, torch.full_like(part.features, float("nan")))
    model = build_model(tiny().model, broken.features.shape[1], seed=0)
    with pytest.raises(FedmergeError, match="NaN"):
        fit(model, [broken], tiny().train, quiet=True)


def test_joint_and_pretrain_commands(tmp_path: Path) -> None:
    """`train --joint` reports every domain.

    `pretrain` gives a base that `train --init` starts from.
    """
    settings = [arg for key in TINY + ["train.epochs=2"] for arg in ("--set", key)]
    out = run_cli(
        "train",
        "--joint",
        "--domains",
        "synth-0,synth-1",
        "--out",
        str(tmp_path / "joint"),
        "--quiet",
        *settings,
        cache=tmp_path / "cache",
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "joint" / "metrics.json").read_text())
    assert sorted({(r["model"], r["domain"]) for r in rows}) == [
        ("base", "synth-0"),
        ("base", "synth-1"),
        ("joint", "synth-0"),
        ("joint", "synth-1"),
    ]
    out = run_cli(
        "pretrain",
        "--domains",
        "synth-2,synth-3",
        "--out",
        str(tmp_path / "pre"),
        "--quiet",
        *settings,
        cache=tmp_path / "cache",
    )
    assert out.returncode == 0, out.stderr
    out = run_cli(
        "train",
        "--domain",
        "synth-0",
        "--init",
        str(tmp_path / "pre"),
        "--out",
        str(tmp_path / "ft"),
        "--quiet",
        *settings,
        cache=tmp_path / "cache",
    )
    assert out.returncode == 0, out.stderr
    base, start = (
        load_file(str(tmp_path / "pre" / "model.safetensors")),
        load_file(str(tmp_path / "ft" / "base.safetensors")),
    )
    assert all(torch.equal(base[k], start[k]) for k in base)
    # pretraining trains the adaptor only
    seeded = load_file(str(tmp_path / "pre" / "base.safetensors"))
    assert all(
        torch.equal(base[k], seeded[k])
        for k in base
        if k.startswith(("blocks.", "codes.", "positions"))
    )
    assert not torch.equal(base["adaptor.projections"], seeded["adaptor.projections"])
    bad = run_cli(
        "train",
        "--domain",
        "synth-0",
        "--init",
        str(tmp_path / "pre"),
        "--out",
        str(tmp_path / "bad"),
        "--set",
        "model.dim=48",
        *settings[:2],
        cache=tmp_path / "cache",
    )
    assert bad.returncode == 2 and "tensor" in bad.stderr and "shape" in bad.stderr


def test_frozen_parameters_keep_their_start_and_the_rest_trains(cache: Path) -> None:
    """``train.frozen``: named parts (or prefixes) stay at their start.

    A name that matches nothing is an error.
    """
    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    model = build_model(tiny().model, part.features.shape[1], seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fit(
        model,
        [part],
        tiny("train.epochs=2", 'train.frozen=["blocks", "codes", "positions"]').train,
        quiet=True,
    )
    after = model.state_dict()
    frozen = [k for k in start if k.startswith(("blocks.", "codes.", "positions"))]
    assert frozen and all(torch.equal(start[k], after[k]) for k in frozen)
    assert not torch.equal(start["adaptor.projections"], after["adaptor.projections"])
    assert all(p.requires_grad for p in model.parameters())  # the model is left trainable
    with pytest.raises(
        FedmergeError, match="train.frozen names 'block'.*adaptor, blocks, codes, positions"
    ):
        fit(model, [part], tiny('train.frozen=["block"]').train, quiet=True)
    with pytest.raises(FedmergeError, match="freezes every parameter"):
        fit(
            model,
            [part],
            tiny('train.frozen=["adaptor", "blocks", "codes", "positions"]').train,
            quiet=True,
        )


def test_pretrain_with_holdout_validates_zero_shot_on_the_held_out_domain(tmp_path: Path) -> None:
    """`pretrain --holdout`: epochs are chosen by the held-out domain's zero-shot valid ndcg@10.

    The rows report it.
    """
    settings = [arg for key in TINY + ["train.epochs=2"] for arg in ("--set", key)]
    out = run_cli(
        "pretrain",
        "--domains",
        "synth-2,synth-3",
        "--holdout",
        "synth-1",
        "--out",
        str(tmp_path / "pre"),
        "--quiet",
        *settings,
        cache=tmp_path / "cache",
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert sorted({(r["model"], r["domain"]) for r in rows if r["split"] == "valid"}) == [
        ("base", "synth-1"),
        ("base", "synth-2"),
        ("base", "synth-3"),
        ("pretrained", "synth-1"),
        ("pretrained", "synth-2"),
        ("pretrained", "synth-3"),
    ]
    facts = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert facts["holdout"] == ["synth-1"] and facts["config"]["train"]["frozen"] == [
        "blocks",
        "positions",
        "codes",
    ]
    held_base = next(
        r for r in rows if (r["model"], r["domain"], r["split"]) == ("base", "synth-1", "valid")
    )
    assert facts["history"][0]["valid_ndcg@10"] == pytest.approx(held_base["ndcg@10"])
    best = next(
        r
        for r in rows
        if (r["model"], r["domain"], r["split"]) == ("pretrained", "synth-1", "valid")
    )
    # the start is a candidate, so the held-out domain never loses
    assert best["ndcg@10"] >= held_base["ndcg@10"]
    bad = run_cli(
        "pretrain",
        "--domains",
        "synth-2,synth-3",
        "--holdout",
        "synth-3",
        "--out",
        str(tmp_path / "bad"),
        *settings,
        cache=tmp_path / "cache",
    )
    assert bad.returncode == 2 and "--holdout synth-3 repeats a --domains domain" in bad.stderr


def test_time_limit_stops_after_the_epoch_that_reaches_it(cache: Path) -> None:
    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    model = build_model(tiny().model, part.features.shape[1], seed=0)
    result = fit(model, [part], tiny("train.epochs=10", "train.max_minutes=1e-6").train, quiet=True)
    assert result.stopped == "time limit of 1e-06 minutes"
    assert [h["epoch"] for h in result.history] == [0, 1]


def test_patience_counts_trained_epochs_and_the_start_stays_a_candidate(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epochs that dip below a strong start do not stop training.

    The best epoch overall is returned.
    """
    import fedmerge.train.loop as loop

    scores = iter([0.50, 0.30, 0.35, 0.40, 0.45, 0.60, 0.55, 0.52, 0.51, 0.99])
    monkeypatch.setattr(loop, "validation_score", lambda *args: next(scores))
    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    model = build_model(tiny().model, part.features.shape[1], seed=0)
    result = fit(model, [part], tiny("train.epochs=20", "train.patience=3").train, quiet=True)
    assert (result.best_epoch, result.best_score) == (5, 0.60)
    assert [h["epoch"] for h in result.history][-1] == 8 and result.stopped.startswith("early stop")
    never = iter([0.50] + [0.40] * 10)
    monkeypatch.setattr(loop, "validation_score", lambda *args: next(never))
    assert (
        fit(model, [part], tiny("train.epochs=20", "train.patience=3").train, quiet=True).best_epoch
        == 0
    )
    never = iter([0.50, 0.40, 0.45, 0.30, 0.20, 0.10])
    monkeypatch.setattr(loop, "validation_score", lambda *args: next(never))
    settings = tiny("train.epochs=20", "train.patience=3", "train.start_candidate=false").train
    assert not settings.start_candidate
    assert fit(model, [part], settings, quiet=True).best_epoch == 2  # the best trained epoch


def test_weight_average_is_what_validation_reads_and_keeps(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.ema``: the moving average is validated and kept.

    The raw weights train exactly as without it.
    """
    import fedmerge.train.loop as loop

    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    validated: list[dict[str, torch.Tensor]] = []

    def rising(model: torch.nn.Module, *args: object) -> float:
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        return float(len(validated))

    monkeypatch.setattr(loop, "validation_score", rising)

    def run(
        *settings: str, state: Path | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = build_model(tiny().model, part.features.shape[1], seed=0)
        kept = fit(model, [part], tiny(*settings).train, state_dir=state, quiet=True).best_state
        return kept, model.state_dict()

    _, raw_final = run("train.epochs=3")
    kept, final = run("train.epochs=3", "train.ema=0.9")
    assert all(torch.equal(raw_final[k], final[k]) for k in final)
    assert all(torch.equal(kept[k], validated[-1][k]) for k in kept)
    assert not torch.allclose(kept["adaptor.projections"], final["adaptor.projections"])
    model = build_model(tiny().model, part.features.shape[1], seed=0)
    average = {name: param.detach().clone() for name, param in model.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
    loop.update_average(average, model, 0.9)
    theta_0 = build_model(tiny().model, part.features.shape[1], seed=0).adaptor.projections.detach()
    torch.testing.assert_close(average["adaptor.projections"], 0.9 * theta_0 + 0.1)
    run("train.epochs=2", "train.ema=0.9", state=tmp_path)  # interrupted after two epochs ...
    resumed, _ = run("train.epochs=3", "train.ema=0.9", state=tmp_path)  # ... and resumed
    assert all(torch.allclose(kept[k], resumed[k], atol=1e-6) for k in kept)


def test_text_weight_is_chosen_on_validation(cache: Path) -> None:
    import fedmerge.train.loop as loop

    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    experiment = tiny("model.text_weights=[0.0, 0.1, 0.5, 2.0]", "train.valid_users=40")
    model = build_model(experiment.model, part.features.shape[1], seed=0)
    config = experiment.train
    sample = loop.validation_parts([part], config.valid_users, config.seed)
    one_by_one = {}
    # each weight set in turn and evaluated as the model scores
    for weight in experiment.model.text_weights:
        model.text_weight.fill_(weight)
        one_by_one[weight] = loop.validation_score(model, sample, config)
    assert len(set(one_by_one.values())) > 1
    tried = loop.calibrate(model, [part], config)  # one pass over the sampled users
    assert tried == one_by_one
    assert float(model.text_weight) == pytest.approx(max(one_by_one, key=one_by_one.get))
    assert model.facts() == {"text_weight": pytest.approx(max(one_by_one, key=one_by_one.get))}
    model.config = tiny("model.text_weights=[]").model  # no values to try: nothing is chosen
    assert loop.calibrate(model, [part], config) == {}
    assert float(model.text_weight) == pytest.approx(max(one_by_one, key=one_by_one.get))


def test_validation_reads_a_seeded_user_sample(cache: Path) -> None:
    from fedmerge.train.loop import validation_parts

    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    assert validation_parts([part], None, 0)[0] is part
    assert validation_parts([part], part.domain.n_users, 0)[0] is part
    sample = validation_parts([part], 7, 0)[0].domain
    again = validation_parts([part], 7, 0)[0].domain
    assert sample.n_users == 7 and sample.user_ids == again.user_ids
    assert (
        set(sample.user_ids) <= set(part.domain.user_ids) and sample.n_items == part.domain.n_items
    )
    user = part.domain.user_ids.index(sample.user_ids[0])
    assert sample.history(0, "valid").tolist() == part.domain.history(user, "valid").tolist()


def test_unusable_device_is_named() -> None:
    from fedmerge.train.loop import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FedmergeError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(FedmergeError, match="train.device is 'cuda'.*set train.device=cpu"):
            resolve_device("cuda")


def test_last_target_scheme_keeps_one_target_per_sequence() -> None:
    from fedmerge.train.batches import last_targets_only

    targets = torch.tensor([[3, 4, 5, -1], [7, -1, -1, -1], [1, 2, 3, 4]])
    assert last_targets_only(targets).tolist() == [
        [-1, -1, 5, -1],
        [7, -1, -1, -1],
        [-1, -1, -1, 4],
    ]


def test_a_run_of_the_same_config_is_recognised_across_added_keys(tmp_path: Path) -> None:
    from fedmerge.train.run import same_config

    config = tiny()
    stored = config.model_dump()
    # a run written before the key existed: its default is what it did
    del stored["train"]["targets"]
    (tmp_path / "config.json").write_text(json.dumps({"config": stored}))
    assert same_config(tmp_path / "config.json", config)
    assert not same_config(tmp_path / "config.json", tiny("train.lr=1e-2"))
    # validated on another domain
    assert not same_config(tmp_path / "config.json", config, ["synth-1"])
    (tmp_path / "config.json").write_text(json.dumps({"config": {"train": {"gone": 1}}}))
    assert not same_config(tmp_path / "config.json", config)
    assert not same_config(tmp_path / "missing.json", config)


def test_sampled_softmax_estimates_the_full_loss_and_trains(tmp_path: Path, cache: Path) -> None:
    config = tiny("model.temperature=1.0")
    model = build_model(config.model, width=32, seed=0).eval()
    features = torch.randn(2000, 32)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = (torch.randint(0, 2000, (8, 10), generator=generator) for _ in range(2))
    inputs[0, 5:], targets[0, 5:] = -1, -1
    full = model.loss(features, inputs, targets).item()
    model.config = config.model.model_copy(update={"negatives": 2000})
    assert model.loss(features, inputs, targets).item() == full  # not smaller than the catalogue
    model.config = config.model.model_copy(update={"negatives": 500})
    sampled = [model.loss(features, inputs, targets).item() for _ in range(20)]
    # log-Q corrected estimate
    assert abs(np.mean(sampled) - full) < 0.01 * full and np.std(sampled) > 0
    rows = train_run(
        ["synth-0"], tiny("train.epochs=12", "model.negatives=50"), tmp_path / "run", quiet=True
    )
    test = {r["model"]: r for r in rows if r["split"] == "test"}
    # 200 items
    popularity = evaluate_domain(popularity_scorer, synthetic_domain("synth-0"), "test")
    assert test["textseq"]["recall@10"] > 2 * popularity["recall@10"]
    assert test["textseq"]["recall@10"] > 1.2 * test["base"]["recall@10"]


def test_training_uses_deterministic_kernels_and_restores_the_setting(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedmerge.train.loop as loop

    seen = []

    # fit's first call: record the setting, then stop training
    def first_step(name: str) -> torch.device:
        seen.append(torch.are_deterministic_algorithms_enabled())
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "resolve_device", first_step)
    part = load_parts(["synth-0"], tiny().model, quiet=True)[0]
    before = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(KeyboardInterrupt):
        loop.fit(
            build_model(tiny().model, part.features.shape[1], seed=0),
            [part],
            tiny().train,
            quiet=True,
        )
    assert seen == [True] and torch.are_deterministic_algorithms_enabled() == before


def test_pretrain_config_freezes_all_but_the_adaptor_unless_told() -> None:
    assert pretrain_config("textseq", []).train.frozen == ["blocks", "positions", "codes"]
    assert pretrain_config("textseq", ["train.frozen=[]"]).train.frozen == []
    assert pretrain_config("textseq", ['train.frozen=["codes"]']).train.frozen == ["codes"]
    # other parameter names: nothing is assumed
    assert pretrain_config("textenc", []).train.frozen == []


def test_batches_per_epoch_trains_on_a_seeded_sample_of_each_epoch(cache: Path) -> None:
    config = tiny("train.epochs=2", "train.batch_size=16", "train.batches_per_epoch=3")
    part = load_parts(["synth-0"], config.model, quiet=True)[0]
    runs = []
    for _ in range(2):
        model = build_model(config.model, part.features.shape[1], config.train.seed)
        result = fit(model, [part], config.train, quiet=True)
        runs.append(result)
        trained = [h for h in result.history if "loss" in h]
        assert len(trained) == 2
        # three batches of at most 16 sequences each epoch, of the domain's ~400 users
        assert all(h["sequences_per_second"] * h["seconds"] <= 3 * 16 for h in trained)
    assert [h["loss"] for h in runs[0].history[1:]] == [h["loss"] for h in runs[1].history[1:]]
    with pytest.raises(FedmergeError, match="train.batches_per_epoch cannot cut an epoch"):
        load_config(
            "simulate",
            ["privacy.mechanism=dpsgd", "privacy.epsilon=8", "train.batches_per_epoch=3"],
            FederationConfig,
        )


def test_sgd_steps_lr_times_the_gradient_where_adamw_steps_about_lr_whatever_its_scale() -> None:
    """``train.optimizer``: why dpsgd may want SGD.

    A coordinate whose gradient is pure noise moves by lr x noise under SGD, and by about lr
    under AdamW (its first step is lr x g / (|g| + eps)), however small the noise.
    """
    from fedmerge.train.loop import optimiser

    model = build_model(tiny().model, 8, seed=0)
    for name, scale in (("sgd", 1e-3), ("sgd", 1.0), ("adamw", 1e-3), ("adamw", 1.0)):
        config = tiny(f"train.optimizer={name}", "train.lr=0.1", "train.warmup_steps=0").train
        params, optimizer, _ = optimiser(model, config)
        before = [p.detach().clone() for p in params]
        draw = torch.Generator().manual_seed(1)
        noise = [scale * torch.randn(p.shape, generator=draw) for p in params]
        for p, g in zip(params, noise, strict=True):
            p.grad = g
        optimizer.step()
        for p, b, g in zip(params, before, noise, strict=True):
            want = -0.1 * g if name == "sgd" else -0.1 * g / (g.abs() + 1e-8)
            assert torch.allclose(p.detach() - b, want, rtol=1e-4, atol=1e-7)
    with pytest.raises(FedmergeError, match="train.momentum = 0.9 is SGD's"):
        tiny("train.momentum=0.9")
