"""The Flower backend: same answer as the in-process pipeline, and nothing private crosses the wire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

import server.app
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.pipeline import InProcess, simulate
from tests.test_pipeline import tiny

ALLOWED_CONFIG = {"federation", "models", "splits", "sample", "party", "domain", "n_items", "text_dim"}
ALLOWED_METRICS = {"users", "n_items", "best_epoch", "best_valid_ndcg@10", "train_seconds", "seconds", "merge_seconds",
                   "text_weight"}


class Recording:
    """A grid that keeps every message it sends and every reply it receives."""

    def __init__(self, grid) -> None:  # type: ignore[no-untyped-def]
        self.grid, self.seen = grid, []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.seen += messages + replies
        return replies


def test_flower_matches_inprocess_and_sends_only_weights_tables_configs_and_aggregates(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("client_cpus=1", "merge.learn.valid_candidates=3")  # the parties also score candidates on valid
    grids: list[Recording] = []
    original = server.app.FlowerBackend.__init__

    def recording_init(self, grid, config):  # type: ignore[no-untyped-def]
        grids.append(Recording(grid))
        original(self, grids[-1], config)

    monkeypatch.setattr(server.app.FlowerBackend, "__init__", recording_init)
    simulate(config, server.app.flower_backend(config), tmp_path / "flower")
    simulate(config, InProcess(config), tmp_path / "inprocess")
    flower, inprocess = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("flower", "inprocess"))
    assert flower == inprocess
    selections = [json.loads((tmp_path / name / "coefficients.json").read_text())["selection"]
                  for name in ("flower", "inprocess")]
    for selection in selections:
        assert selection.pop("seconds") > 0
    assert selections[0] == selections[1] and selections[0]["steps"] == [0, 20, 40]

    users = {u for name in config.domains for u in synthetic_domain(name).user_ids}
    weights = set(load_keys(tmp_path / "flower" / "merged.safetensors"))
    assert grids and grids[0].seen
    for msg in grids[0].seen:
        if msg.has_error():
            continue
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                keys = set(record.keys())
                assert keys <= weights or keys == {"features"}, (name, keys)
            elif isinstance(record, ConfigRecord):
                assert set(record.keys()) <= ALLOWED_CONFIG, (name, set(record.keys()))
                assert not any(str(v) in users for v in record.values())
            elif isinstance(record, MetricRecord):
                for key, value in record.items():
                    assert key in ALLOWED_METRICS or key.split("@")[0] in {"recall", "ndcg", "mrr"}, key
                    assert not isinstance(value, list), key  # aggregates only, never per-user values
            else:
                pytest.fail(f"unexpected record {name!r} of type {type(record).__name__}")


def load_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def test_a_supernode_is_resolved_from_its_node_config_and_a_foreign_domain_is_named() -> None:
    from types import SimpleNamespace

    from clients.app import _spec
    from fedmerge.errors import FedmergeError

    config = tiny("parties_per_domain=2")
    node = SimpleNamespace(node_config={"domain": "synth-1", "shard": 1})
    assert (_spec(config, node).party, _spec(config, node).domain) == (3, "synth-1")  # type: ignore[arg-type]
    assert _spec(config, SimpleNamespace(node_config={"partition-id": 2})).domain == "synth-1"  # type: ignore[arg-type]
    with pytest.raises(FedmergeError, match="serves domain 'books' shard 0, which the run does not have"):
        _spec(config, SimpleNamespace(node_config={"domain": "books"}))  # type: ignore[arg-type]
