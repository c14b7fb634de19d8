"""A model family defined in this file only.

Registered, it trains, merges (training-free and learned) and runs the federation on both backends,
with no change to fedmerge. The Flower backend's parties run in Ray workers, which register it by
importing this module (``FEDMERGE_PLUGINS``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from fedmerge.config import load_config
from fedmerge.data.domain import DomainData
from fedmerge.data.sequences import last_items
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.merge import merge
from fedmerge.merge.run import merge_run
from fedmerge.merge.server import MergeConfig
from fedmerge.models import FamilyConfig, Recommender, load_parts, register
from fedmerge.models.family import HistoryScorer
from fedmerge.pipeline import InProcess, simulate
from fedmerge.protocol import FederationConfig
from fedmerge.text import feature_table, get_encoder
from fedmerge.train.checkpoint import load_checkpoint, read_state
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.run import train_run


class MeanConfig(FamilyConfig):
    """A mean-pooled MLP over hashed item-text features."""

    kind: Literal["meanmlp"] = Field("meanmlp", description="the model family")
    dim: int = Field(16, ge=1, description="vector size")
    temperature: float = Field(0.1, gt=0.0, description="softmax temperature")


@register
class MeanMLP(Recommender):
    """Item vector = MLP(features); user vector = a linear map of the history's mean item vector."""

    kind = "meanmlp"
    Config = MeanConfig
    config: MeanConfig

    def __init__(self, config: MeanConfig, width: int) -> None:
        super().__init__(config, width)
        self.items = nn.Sequential(
            nn.Linear(width, config.dim), nn.Tanh(), nn.Linear(config.dim, config.dim)
        )
        self.user = nn.Linear(config.dim, config.dim)

    @classmethod
    def catalogue(
        cls, domain: DomainData, config: FamilyConfig, quiet: bool = True
    ) -> torch.Tensor:
        return torch.from_numpy(feature_table(domain, get_encoder("hashing"), quiet=quiet))

    def _users(self, items: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        seen = (histories >= 0).unsqueeze(-1).float()
        mean = (items[histories.clamp(min=0)] * seen).sum(1) / seen.sum(1).clamp(min=1.0)
        return F.normalize(mean + self.user(mean), dim=-1)

    def loss(
        self, table: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        items = F.normalize(self.items(table), dim=-1)
        logits = self._users(items, inputs) @ items.T / self.config.temperature
        return F.cross_entropy(logits, last_items(targets))

    def scorer(self, table: torch.Tensor) -> HistoryScorer:
        items = F.normalize(self.items(table), dim=-1)
        return lambda histories: self._users(items, histories) @ items.T


SMALL = [
    "model.kind=meanmlp",
    "train.epochs=3",
    "train.batch_size=32",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "train.patience=5",
    "train.eval_batch_size=256",
]


def test_a_family_of_ones_own_trains_and_merges_without_a_change_to_fedmerge(
    tmp_path: Path, cache: Path
) -> None:
    config = load_config(None, SMALL, ExperimentConfig)
    assert isinstance(config.model, MeanConfig)
    domains = ["synth-0", "synth-1"]
    runs = [tmp_path / name for name in domains]
    for name, run in zip(domains, runs, strict=True):
        rows = train_run([name], config, run, quiet=True)
        assert {r["model"] for r in rows} == {"base", "meanmlp"}
        model, _, meta = load_checkpoint(run)  # written and read back as the family's model
        assert isinstance(model, MeanMLP) and meta["kind"] == "meanmlp"
        part = load_parts([name], config.model, quiet=True)[0]
        recorded = next(r for r in rows if r["model"] == "meanmlp" and r["split"] == "test")
        again = evaluate_domain(model_scorer(model, part.features), part.domain, "test")
        assert again["ndcg@10"] == pytest.approx(recorded["ndcg@10"], abs=1e-6)
        assert not torch.equal(
            read_state(run / "model.safetensors")["user.weight"],
            # training moved the weights
            read_state(run / "base.safetensors")["user.weight"],
        )

    base = read_state(runs[0] / "base.safetensors")
    states = [read_state(run / "model.safetensors") for run in runs]
    free = MergeConfig.model_validate({"method": "ties", "learn": {"mode": "none"}})
    _, outcome = merge_run(
        runs[0] / "base.safetensors", runs, domains, free, tmp_path / "free", quiet=True
    )
    expected = merge(base, states, "ties")
    # the method, exactly
    assert all(torch.allclose(outcome.merged[k], expected[k], atol=1e-6) for k in expected)

    learned = MergeConfig.model_validate(
        {"method": "ties", "learn": {"mode": "layer-wise", "steps": 15, "lr": 0.05}}
    )
    _, outcome = merge_run(
        runs[0] / "base.safetensors", runs, domains, learned, tmp_path / "learned", quiet=True
    )
    coefficients = outcome.coefficients
    assert coefficients["groups"] == ["others"]  # the contract's default: one layer group
    # the coefficients were learned
    assert coefficients["weights"] != [[w] for w in coefficients["initial"]]
    assert all(torch.isfinite(t).all() for t in outcome.merged.values())


def test_a_family_of_ones_own_runs_the_federation_on_both_backends(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.simulation import flower_backend

    # the Ray workers register the family by importing this file
    monkeypatch.setenv("FEDMERGE_PLUGINS", __name__)
    config = load_config(
        None,
        [
            'domains=["synth-0", "synth-1"]',
            *SMALL,
            "client_cpus=1",
            "evaluate_valid=false",
            "merge.learn.mode=layer-wise",
            "merge.learn.steps=10",
        ],
        FederationConfig,
    )
    simulate(config, InProcess(config), tmp_path / "inprocess")
    simulate(config, flower_backend(config), tmp_path / "flower")
    inprocess, flower = (
        json.loads((tmp_path / name / "metrics.json").read_text())
        for name in ("inprocess", "flower")
    )
    assert inprocess == flower
    assert {r["model"] for r in flower} == {
        "theta_0",
        "fine-tuned on synth-0",
        "fine-tuned on synth-1",
        "ties (training-free)",
        "merged (layer-wise, mergerec)",
    }
