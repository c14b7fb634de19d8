"""MergeRec's recipe as published (configs/simulate-mergerec.toml).

Its settings, and a CE term that moves with the coefficients for a text-encoder family, where the
default candidate vectors make it degenerate.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.func import functional_call

from fedmerge import cli
from fedmerge.config import load_config
from fedmerge.merge.learn import _Student, build_merged, parameter_groups
from fedmerge.merge.methods import prepare
from fedmerge.merge.pseudo import one_item_users
from fedmerge.models import build_model, load_parts
from fedmerge.protocol import FederationConfig
from fedmerge.train.config import ExperimentConfig

TINY_ENCODER = [
    "model.kind=textenc",
    "model.pretrained=false",
    "model.dim=32",
    "model.layers=2",
    "model.heads=2",
    "model.item_tokens=8",
    "model.history_tokens=32",
    "model.max_len=5",
]


def test_the_preset_is_mergerec_as_published() -> None:
    config = load_config("simulate-mergerec", [], FederationConfig)
    merge, learn = config.merge, config.merge.learn
    assert (merge.method, merge.params, merge.rows) == (
        "ties",
        {"density": 0.2, "scope": "global", "lam": 1.0},
        "method",
    )
    assert (
        learn.mode,
        learn.loss,
        learn.temperature,
        learn.kd_weight,
        learn.lr,
        learn.batch_size,
        learn.steps,
    ) == ("layer-wise", "mergerec", 0.05, 2.5, 1e-3, 16, 500)
    assert (learn.fit_scale, learn.item_vectors, learn.teacher_top_k, learn.balance) == (
        False,
        "fixed",
        0,
        False,
    )
    # the last step is kept: no choice on valid data
    assert (learn.valid_candidates, learn.valid_scales) == (0, [])
    assert (learn.pseudo.selection, learn.pseudo.walk_length, learn.pseudo.target) == (
        "all",
        1,
        "last",
    )
    assert config.model.kind == "textenc"
    # fedmerge merge --config
    assert cli.merge_config(None, None, None, None, [], "simulate-mergerec") == merge
    assert (
        cli.merge_config(None, "task-wise", None, None, [], "simulate-mergerec").learn.mode
        == "task-wise"
    )


def own_item_scores(follow: str, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny text encoder's pseudo-users [i] of synth-0 under coefficients off the initial merge.

    Returns each one's score of its own item i, and the gradient of their sum with respect to the
    coefficients.
    """
    config = load_config(None, TINY_ENCODER, ExperimentConfig)
    part = load_parts(["synth-0"], config.model, quiet=True)[0]
    table = part.features[:40]
    model = build_model(config.model, table.shape[1], seed=0)
    base = model.exchanged()
    generator = torch.Generator().manual_seed(1)
    vectors = [
        {
            k: 0.05 * torch.randn(v.shape, generator=generator)
            for k, v in base.items()
            if v.is_floating_point()
        }
        for _ in range(2)
    ]  # two domains' task vectors
    prepared = prepare("ties", vectors)
    group_of, groups = parameter_groups(model, list(prepared.vectors[0]), "layer-wise")
    assert groups == ["others", "block 0", "block 1"]
    model.load_exchanged(
        build_merged(
            base, prepared.vectors, torch.tensor(prepared.weights)[:, None].repeat(1, 3), group_of
        )
    )
    anchor = model.merge_anchor(table)  # the initial merge's item vectors
    weights = torch.nn.Parameter(1.3 * torch.tensor(prepared.weights)[:, None].repeat(1, 3))
    params = {
        f"model.{k}": v for k, v in build_merged(base, prepared.vectors, weights, group_of).items()
    }
    users = one_item_users(torch.arange(len(table)))
    scores = functional_call(
        _Student(model, follow).eval(), params, (table, anchor, users.histories)
    )  # type: ignore[arg-type]
    own = scores[torch.arange(len(table)), users.items]
    own.sum().backward()
    return own.detach(), weights.grad


def test_the_textenc_ce_term_moves_with_the_coefficients_only_with_fixed_candidates(
    cache: Path,
) -> None:
    own, grad = own_item_scores("history", cache)  # a history [i] encodes exactly like item i
    # the CE target's score is 1 whatever the coefficients
    assert torch.allclose(own, torch.ones_like(own), atol=1e-5)
    assert grad.abs().max() < 1e-4
    # MergeRec: candidates keep the initial merge's vectors
    own, grad = own_item_scores("fixed", cache)
    # off the initial merge, a history no longer scores its item at exactly 1
    assert (own < 1 - 1e-3).all()
    assert grad.abs().min() > 1e-4  # and every coefficient moves the CE target's score
