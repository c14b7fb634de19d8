"""The federation's protocol and server loop, in process, on tiny synthetic domains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmerge.config import load_config
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.models import build_model
from fedmerge.pipeline import InProcess, simulate
from fedmerge.protocol import (
    FederationConfig,
    TrainReply,
    average_parties,
    base_weights,
    fine_tuned,
    party_data,
    party_evaluate,
    party_specs,
)
from fedmerge.runs.rundir import RunDir
from fedmerge.train.loop import calibrate, validation_parts, validation_score

TINY = [
    "model.encoder=hashing",
    "model.dim=32",
    "model.heads=2",
    "model.layers=1",
    "model.experts=2",
    "train.batch_size=32",
    "train.warmup_steps=5",
    "train.lr=3e-3",
    "train.epochs=4",
    "train.patience=20",
    "merge.learn.steps=40",
]


def tiny(*extra: str) -> FederationConfig:
    return load_config(None, ['domains=["synth-0", "synth-1"]', *TINY, *extra], FederationConfig)


def test_inprocess_run_writes_every_model_for_every_domain(tmp_path: Path, cache: Path) -> None:
    config = tiny()
    results = simulate(config, InProcess(config), tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    models = {r["model"] for r in rows}
    assert models == {
        "theta_0",
        "fine-tuned on synth-0",
        "fine-tuned on synth-1",
        "ties (training-free)",
        "merged (task-wise, mergerec)",
    }
    assert {(r["domain"], r["split"]) for r in rows} == {
        (d, s) for d in ("synth-0", "synth-1") for s in ("valid", "test")
    }
    test = {(r["model"], r["domain"]): r["recall@10"] for r in rows if r["split"] == "test"}
    # fine-tuning helps at home; the merge keeps more than the start
    for domain in ("synth-0", "synth-1"):
        assert test[(f"fine-tuned on {domain}", domain)] > test[("theta_0", domain)]
        assert test[("merged (task-wise, mergerec)", domain)] > test[("theta_0", domain)]
    merged = load_file(str(tmp_path / "run" / "merged.safetensors"))
    assert all(torch.equal(merged[k], v) for k, v in results[-1].merge.merged.items())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    events = [
        json.loads(line)["event"]
        for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    ]
    assert (
        events[:2] == ["data_start", "party_ready"]
        and "parties" in events
        and events[-1] == "round_done"
    )
    # each party, as it replies
    assert events.count("party_trained") == events.count("party_ready") == 2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| merged (task-wise, mergerec) |" in report and "synth-0 text_weight" in report
    # each party's choice, reported
    assert all(r["text_weight"] in tiny().model.text_weights for r in rows)
    test_only = tiny("evaluate_valid=false")  # the same run, parties evaluate on test only
    simulate(test_only, InProcess(test_only), tmp_path / "test-only")
    assert json.loads((tmp_path / "test-only" / "metrics.json").read_text()) == [
        r for r in rows if r["split"] == "test"
    ]


def test_shards_split_users_disjointly_and_fedavg_weights_by_users(cache: Path) -> None:
    config = tiny("parties_per_domain=3")
    specs = party_specs(config)
    assert [(s.party, s.domain, s.shard) for s in specs[:4]] == [
        (0, "synth-0", 0),
        (1, "synth-0", 1),
        (2, "synth-0", 2),
        (3, "synth-1", 0),
    ]
    shards = [party_data(s, config).domain for s in specs[:3]]
    users = [u for d in shards for u in d.user_ids]
    assert len(users) == len(set(users)) == 400  # synth-0 has 400 users
    start = {"w": torch.zeros(2), "n": torch.tensor([3])}
    # updates: the floating tensors only
    one, three = {"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}
    avg = average_parties(
        [
            TrainReply("a", one, {"users": 1.0, "n_items": 4.0, "train_seconds": 1.0}),
            TrainReply("a", three, {"users": 3.0, "n_items": 4.0, "train_seconds": 2.0}),
        ]
    )
    np.testing.assert_allclose(avg.update["w"], [2.5, 2.5])
    assert set(avg.update) == {"w"} and avg.metrics["users"] == 4.0
    weights = fine_tuned(start, avg)  # integer buffers are the start's
    np.testing.assert_allclose(weights["w"], [2.5, 2.5])
    assert torch.equal(weights["n"], start["n"])


def test_candidates_are_scored_on_the_valid_users_that_chose_the_epoch(cache: Path) -> None:
    config = tiny("train.valid_users=50")
    part = party_data(party_specs(config)[0], config)
    base = base_weights(config, part.features.shape[1])
    full = party_evaluate(part, base, config, ("valid",))["valid"]
    sampled = party_evaluate(part, base, config, ("valid",), sample=True)["valid"]
    assert full["users"] == 400 and sampled["users"] == 50  # synth-0: every user has a valid item
    model = build_model(config.model, part.features.shape[1], config.seed)
    model.load_exchanged(base)
    calibrate(model, [part], config.train)
    seen_in_training = validation_score(
        model, validation_parts([part], 50, config.train.seed), config.train
    )
    assert sampled["ndcg@10"] == pytest.approx(seen_in_training, abs=1e-9)


def test_each_party_sets_the_text_weight_of_a_received_model_on_its_valid_users(
    cache: Path,
) -> None:
    config = tiny("train.valid_users=50", "model.text_weights=[0.0, 0.5, 3.0]")
    part = party_data(party_specs(config)[0], config)
    model = build_model(config.model, part.features.shape[1], config.seed)
    tried = calibrate(model, [part], config.train)
    chosen, worst = max(tried, key=tried.get), min(tried, key=tried.get)
    assert tried[chosen] > tried[worst]
    # the model arrives with the weight this party's users like least
    model.text_weight.fill_(worst)
    received = {k: v.clone() for k, v in model.exchanged().items()}
    local = party_evaluate(part, received, config, ("valid", "test"))
    as_received = party_evaluate(
        part, received, tiny("train.valid_users=50", "local_calibration=false"), ("valid", "test")
    )
    assert local["test"]["text_weight"] == chosen and as_received["test"]["text_weight"] == worst
    for weight, metrics in ((chosen, local), (worst, as_received)):
        model.text_weight.fill_(weight)
        for split in ("valid", "test"):
            expected = evaluate_domain(model_scorer(model, part.features), part.domain, split)
            assert metrics[split]["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-9)
    # the choice reads the whole valid split: its pass is the row
    every_user = tiny("model.text_weights=[0.0, 0.5, 3.0]")
    whole = party_evaluate(part, received, every_user, ("valid",))["valid"]
    model.text_weight.fill_(whole["text_weight"])
    expected = evaluate_domain(model_scorer(model, part.features), part.domain, "valid")
    assert whole == pytest.approx(
        {k: float(v) for k, v in expected.items()} | {"text_weight": whole["text_weight"]},
        abs=1e-12,
    )


class _Faulty(InProcess):
    """Party 1 raises during training, or sends a NaN update, or an update of the wrong shape."""

    def __init__(self, config: FederationConfig, fault: str) -> None:
        super().__init__(config)
        self.fault = fault

    def train(self, start):  # type: ignore[no-untyped-def]
        replies = super().train(start)
        if self.fault == "raise":
            replies[1] = RuntimeError("disk full")
        else:
            replies[1].update = {k: v.clone() for k, v in replies[1].update.items()}
            if self.fault == "nan":
                replies[1].update["positions"][0, 0] = float("nan")
            else:
                replies[1].update["positions"] = replies[1].update["positions"][:-1]
        return replies


@pytest.mark.parametrize(
    "fault, reason", [("raise", "disk full"), ("nan", "NaN"), ("shape", "'positions' has shape")]
)
def test_a_failing_party_is_left_out_and_named_or_stops_the_run(
    tmp_path: Path, cache: Path, fault: str, reason: str
) -> None:
    config = tiny("parties_per_domain=2", "min_parties=3")
    results = simulate(config, _Faulty(config, fault), tmp_path / "ok")
    assert list(results[0].failed) == ["synth-0/1"] and reason in results[0].failed["synth-0/1"]
    assert (
        "synth-0/1" in json.loads((tmp_path / "ok" / "run.json").read_text())["failed"]["round 1"]
    )
    strict = tiny("parties_per_domain=2")
    with pytest.raises(FedmergeError, match=f"only 3 of 4 parties replied.*synth-0/1.*{reason}"):
        simulate(strict, _Faulty(strict, fault), tmp_path / "stopped")
    # the failed run's record and log
    status = json.loads((tmp_path / "stopped.partial" / "run.json").read_text())
    assert status["status"] == "failed" and "only 3 of 4 parties" in status["error"]
    assert (
        not (tmp_path / "stopped").exists()
        and not (tmp_path / "stopped.partial" / "metrics.json").exists()
    )
    if fault == "raise":  # a failing rerun into a finished run's folder leaves it byte for byte
        finished = {p.name: p.read_bytes() for p in (tmp_path / "ok").iterdir()}
        with pytest.raises(FedmergeError, match="only 3 of 4 parties replied"):
            simulate(strict, _Faulty(strict, fault), tmp_path / "ok")
        assert {p.name: p.read_bytes() for p in (tmp_path / "ok").iterdir()} == finished


def test_bad_federation_configs_are_named(tmp_path: Path) -> None:
    with pytest.raises(FedmergeError, match="'synth-0' is listed twice"):
        load_config(None, ['domains=["synth-0", "synth-0"]'], FederationConfig)
    with pytest.raises(FedmergeError, match="min_parties = 5 but the run has only 4 parties"):
        tiny("parties_per_domain=2", "min_parties=5")
    with pytest.raises(FedmergeError, match="method"):
        tiny("merge.method=nonsense")
    with pytest.raises(FedmergeError, match="unknown domain 'nowhere'"):
        config = load_config(None, ['domains=["nowhere"]'], FederationConfig)
        simulate(config, InProcess(config), tmp_path / "x")
    with pytest.raises(FedmergeError, match="fewer than its 500 parties"):
        config = tiny("parties_per_domain=500")
        simulate(config, InProcess(config), tmp_path / "y")


class _Interrupted(InProcess):
    def train(self, start):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt


def test_an_interrupted_run_is_marked_and_presents_no_results(tmp_path: Path, cache: Path) -> None:
    config = tiny()
    with pytest.raises(KeyboardInterrupt):
        simulate(config, _Interrupted(config), tmp_path / "run")
    assert (
        json.loads((tmp_path / "run.partial" / "run.json").read_text())["status"] == "interrupted"
    )
    assert not (tmp_path / "run").exists()
    assert not any(
        (tmp_path / "run.partial" / name).exists()
        for name in ("metrics.json", "report.md", "merged.safetensors")
    )
    # a server thread that finishes after the interrupt writes nothing
    late = RunDir(tmp_path / "late", {})
    late.finish("interrupted")
    with pytest.raises(FedmergeError, match="ended as 'interrupted'; its results are not written"):
        late.write_results([], {}, {}, "")
    assert sorted(p.name for p in (tmp_path / "late.partial").iterdir()) == [
        "config.json",
        "events.jsonl",
        "run.json",
    ]
