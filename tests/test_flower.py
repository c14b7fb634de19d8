"""The Flower backend: same answer as the in-process pipeline, nothing private on the wire."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from safetensors.torch import load_file

import server.app
import server.simulation
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from fedmerge.models import load_parts
from fedmerge.pipeline import InProcess, Server, simulate
from fedmerge.privacy import PrivacyConfig
from fedmerge.privacy.base import clip_update
from fedmerge.protocol import FederationConfig, base_weights, party_data, party_specs, party_train
from server.records import (
    evaluate_asked,
    read_evaluate_request,
    read_metrics,
    read_train_reply,
    sender,
)
from tests.test_pipeline import tiny

ALLOWED_CONFIG = {"federation", "models", "splits", "sample", "party", "domain", "n_items"}
ALLOWED_METRICS = {
    "users",
    "n_items",
    "epochs",
    "best_epoch",
    "best_valid_ndcg@10",
    "last_loss",
    "train_seconds",
    "seconds",
    "merge_seconds",
    "text_weight",
    "epsilon",
    "delta",
    "noise",
}


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


def record_grids(monkeypatch: pytest.MonkeyPatch) -> list[Recording]:
    """The grids of every Flower run started from now on, each recording its messages."""
    grids: list[Recording] = []
    for backend in (server.app.FlowerBackend, server.app.FlowerWoven):

        def recording_init(self, grid, config, context=None, original=backend.__init__):  # type: ignore[no-untyped-def]
            grids.append(Recording(grid))
            original(self, grids[-1], config, context)

        monkeypatch.setattr(backend, "__init__", recording_init)
    return grids


def on_both_backends(
    config: FederationConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[dict], list[dict], list[Recording]]:
    """The metric rows of `config` on Flower (its messages recorded) and in process."""
    grids = record_grids(monkeypatch)
    simulate(config, server.simulation.flower_backend(config), tmp_path / "flower")
    simulate(config, InProcess(config), tmp_path / "inprocess")
    flower, inprocess = (
        json.loads((tmp_path / name / "metrics.json").read_text())
        for name in ("flower", "inprocess")
    )
    return flower, inprocess, grids


PRIVATE = {
    "none": [],
    "update-dp": ["rounds=2", "privacy.noise_multiplier=0.5", "privacy.clip=0.5"],
    "dpsgd": ["privacy.epsilon=8", "train.epochs=1"],
    "central-dp": [
        "privacy.epsilon=8",
        "merge.method=average",
        "merge.learn.mode=none",
        "merge.rows=method",
    ],
    "secagg": ["parties_per_domain=2"],
}


@pytest.mark.parametrize("mode", list(PRIVATE))
def test_flower_matches_inprocess_and_sends_only_weights_tables_configs_and_aggregates(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # the parties also score candidates on valid (switched off under a DP mechanism)
    config = tiny(
        "client_cpus=1",
        "merge.learn.valid_candidates=3",
        f"privacy.mechanism={mode}",
        *PRIVATE[mode],
    )
    flower, inprocess, grids = on_both_backends(config, tmp_path, monkeypatch)
    if mode == "secagg":  # SecAgg+ quantises the parties' vectors
        assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in flower] == [
            {k: v for k, v in r.items() if not isinstance(v, float)} for r in inprocess
        ]
        assert all(
            abs(a[k] - b[k]) < 1e-4
            for a, b in zip(flower, inprocess, strict=True)
            for k in a
            if isinstance(a[k], float)
        )
    else:
        assert flower == inprocess
    records = [
        json.loads((tmp_path / name / "run.json").read_text()).get("privacy")
        for name in ("flower", "inprocess")
    ]
    assert records[0] == records[1]  # each party's ledger lives across rounds on either backend
    selections = [
        json.loads((tmp_path / name / "coefficients.json").read_text())["selection"]
        for name in ("flower", "inprocess")
    ]
    if mode in ("none", "secagg"):
        for selection in selections:
            assert selection.pop("seconds") > 0
        assert selections[0]["steps"] == selections[1]["steps"] == [0, 20, 40]
        if mode == "none":
            assert selections[0] == selections[1]
    else:
        assert selections == [None, None]  # no valid choice under a DP mechanism
        assert {r["split"] for r in flower} == {"test"}
        audit_private(mode, config, grids[0].seen, records[0])

    users = {u for name in config.domains for u in synthetic_domain(name).user_ids}
    merged = load_file(str(tmp_path / "flower" / "merged.safetensors"))
    weights = set(merged)
    floating = {k for k, v in merged.items() if v.is_floating_point()}
    assert floating < weights  # the model has integer buffers too, which no update carries
    assert grids and grids[0].seen
    seen = {"train": 0, "query": 0}
    secure = [m for m in grids[0].seen if RECORD_KEY_CONFIGS in m.content.config_records]
    assert bool(secure) == (mode == "secagg")
    if mode == "secagg":
        audit_secagg(secure, config)
    for msg in grids[0].seen:
        if msg.has_error() or msg in secure:
            continue
        kind, reply = msg.metadata.message_type, bool(msg.metadata.reply_to_message_id)
        arrays = [name for name, record in msg.content.items() if isinstance(record, ArrayRecord)]
        # the party's update: exactly one ArrayRecord, the floating tensors
        if reply and kind == "train":
            assert arrays == ["update"], arrays
            assert set(msg.content["update"].keys()) == floating
            seen["train"] += 1
        if reply and kind == "query":  # the public item table travels once, in the query reply
            assert arrays == ["table"], arrays
            seen["query"] += 1
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                keys = set(record.keys())
                if name == "table":
                    assert reply and kind == "query" and keys == {"table"}, (kind, name, keys)
                else:
                    assert keys <= weights, (name, keys)
            elif isinstance(record, ConfigRecord):
                assert set(record.keys()) <= ALLOWED_CONFIG, (name, set(record.keys()))
                assert not any(str(v) in users for v in record.values())
            elif isinstance(record, MetricRecord):
                for key, value in record.items():
                    assert key in ALLOWED_METRICS or key.split("@")[0] in {
                        "recall",
                        "ndcg",
                        "mrr",
                    }, key
                    # aggregates only, never per-user values
                    assert not isinstance(value, list), key
            else:
                pytest.fail(f"unexpected record {name!r} of type {type(record).__name__}")
    trained = 0 if mode == "secagg" else config.n_parties * config.rounds  # secagg: masked only
    assert seen == {"train": trained, "query": config.n_parties}


def audit_secagg(secure: list[Message], config: FederationConfig) -> None:
    """Under secagg no party's update, nor its number of users, reaches the server in clear."""
    replies = [m for m in secure if m.metadata.reply_to_message_id]
    for msg in replies:
        assert all(
            len(record) == 0 for record in msg.content.values() if isinstance(record, ArrayRecord)
        )  # SecAgg+'s mod clears the plain vectors; only masked integers travel
    masked = [m for m in replies if "masked_params" in m.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == config.n_parties * config.rounds


def audit_private(
    mode: str, config: FederationConfig, seen: list[Message], record: dict[str, Any]
) -> None:
    """What a DP mechanism changes on the wire: no clean update reaches anyone it must not."""
    replies = [m for m in seen if not m.has_error() and m.metadata.reply_to_message_id]
    trained = [m for m in replies if m.metadata.message_type == "train"]
    for msg in trained:  # no metric of the private data beside the guarantee
        assert not {"best_valid_ndcg@10", "last_loss", "best_epoch"} & set(read_metrics(msg))
    requests = [
        m
        for m in seen
        if m.metadata.message_type == "evaluate" and not m.metadata.reply_to_message_id
    ]
    assert all(read_evaluate_request(m).splits == ("test",) for m in requests)
    if mode == "central-dp":
        # the trusted server saw clean updates; the parties see theta_0 and the noised mean only
        assert {evaluate_asked(m)[0] for m in requests} == {2}
        assert set(record["spent"]) == {"server"}
        return
    assert set(record["spent"]) == set(config.domains)
    if mode == "update-dp":
        # round 1: what party 0 sent is its clean update, clipped, plus N(0, (z C)^2)
        spec = party_specs(config)[0]
        part = party_data(spec, config)
        clean = party_train(
            part,
            base_weights(config, part.features.shape[1]),
            config.model_copy(update={"privacy": PrivacyConfig()}),
        ).update
        sent = next(
            read_train_reply(m).update
            for m in trained
            if sender(m) == spec.party and m.metadata.group_id == "1"
        )
        clipped, _ = clip_update(clean, config.privacy.clip)
        noise = torch.cat([(sent[k] - clipped[k]).flatten() for k in clean])
        std = config.privacy.noise_multiplier * config.privacy.clip
        assert abs(float(noise.std()) / std - 1.0) < 0.02 and abs(float(noise.mean())) < 0.01 * std


def test_a_supernode_is_resolved_from_its_node_config_and_a_foreign_domain_is_named() -> None:
    from clients.app import _spec

    config = tiny("parties_per_domain=2")
    node = SimpleNamespace(node_config={"domain": "synth-1", "shard": 1})
    assert (_spec(config, node).party, _spec(config, node).domain) == (3, "synth-1")  # type: ignore[arg-type]
    assert _spec(config, SimpleNamespace(node_config={"partition-id": 2})).domain == "synth-1"  # type: ignore[arg-type]
    with pytest.raises(
        FedmergeError, match="serves domain 'books' shard 0, which the run does not have"
    ):
        _spec(config, SimpleNamespace(node_config={"domain": "books"}))  # type: ignore[arg-type]


def _metadata(node: int, src: int, dst: int, reply_to: str) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"{'m' if reply_to else 'r'}{node}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )


def _train_reply(
    node: int, content: RecordDict | None = None, error: str | None = None, src: int | None = None
) -> Message:
    """What the grid hands the strategy for the request to `node` (``r{node}``).

    Its content, or the error Flower wraps a raising ClientApp in (`src` 1: the error the
    SuperLink sends for a node gone offline).
    """
    metadata = _metadata(node, node if src is None else src, 0, f"r{node}")
    if error is not None:
        return Message(error=Error(code=0, reason=error), metadata=metadata)
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize("min_parties", [2, None])
def test_the_strategy_names_a_party_that_errs_sends_a_malformed_reply_wrong_shapes_or_stays_silent(
    cache: Path, monkeypatch: pytest.MonkeyPatch, min_parties: int | None
) -> None:
    # None: all
    config = tiny("parties_per_domain=3", *([f"min_parties={min_parties}"] if min_parties else []))
    part = party_data(party_specs(config)[0], config)
    base = base_weights(config, part.features.shape[1])
    update = {k: torch.zeros_like(v) for k, v in base.items() if v.is_floating_point()}
    wrong = dict(update) | {"positions": torch.zeros(3, 3)}

    def content(party: int, vector: dict, domain: str, with_update: bool = True) -> RecordDict:
        record = RecordDict(
            {
                "metrics": MetricRecord({"users": 10.0, "n_items": 5.0, "train_seconds": 1.0}),
                "party": ConfigRecord({"party": party, "domain": domain}),
            }
        )
        if with_update:
            record["update"] = ArrayRecord(vector)
        return record

    replies = [
        _train_reply(10, content(0, update, "synth-0")),
        _train_reply(11, error="Error: Node Unavailable", src=1),  # the SuperLink's, for node 11
        _train_reply(12, content(2, update, "synth-0", with_update=False)),
        _train_reply(13, content(3, update, "synth-1")),
        _train_reply(14, content(4, wrong, "synth-1")),
    ]  # node 15 (synth-1/2) never replies
    tables = {
        p.domain.name: p.features for p in load_parts(config.domains, config.model, quiet=True)
    }
    host = Server(config, tables)
    accepted: dict = {}

    def merge(round_, start, replies, judge):  # type: ignore[no-untyped-def]
        accepted.update(replies)
        return SimpleNamespace(merged=start, seconds=0.0), {}

    monkeypatch.setattr(host, "merge", merge)
    strategy = server.app.MergeRecStrategy(config, host, {party: 10 + party for party in range(6)})
    strategy.requests = [
        Message(RecordDict(), metadata=_metadata(n, 0, n, "")) for n in range(10, 16)
    ]
    strategy.start_weights = base
    host.begin(1)
    if min_parties is None:
        with pytest.raises(
            FedmergeError,
            match="only 2 of 6 parties replied, fewer than min_parties = 6.*synth-1/2",
        ):
            strategy.aggregate_train(1, replies)
        return
    strategy.aggregate_train(1, replies)
    assert sorted(accepted) == [0, 3]
    assert sorted(host.failed) == ["synth-0/1", "synth-0/2", "synth-1/1", "synth-1/2"]
    assert "Node Unavailable" in host.failed["synth-0/1"]
    assert "malformed reply" in host.failed["synth-0/2"] and "update" in host.failed["synth-0/2"]
    assert "'positions' has shape (3, 3)" in host.failed["synth-1/1"]
    assert host.failed["synth-1/2"] == "no reply (timed out)"


ENDLESS = [
    "model.encoder=hashing",
    "model.dim=32",
    "model.heads=2",
    "model.layers=1",
    "train.max_minutes=null",
    "train.epochs=100000",
    "train.patience=100000",
]
"""Settings of a run that trains until it is stopped."""


def simulate_command(backend: str, out: Path, settings: list[str]) -> list[str]:
    """``fedmerge simulate`` on synth-0 and synth-1 into `out`, as a subprocess command line."""
    return [
        sys.executable,
        "-m",
        "fedmerge",
        "simulate",
        "--domains",
        "synth-0,synth-1",
        "--backend",
        backend,
        "--out",
        str(out),
        *[x for item in settings for x in ("--set", item)],
    ]


def _reached(moment: str, partial: Path, session: int) -> bool:
    """Whether the run in `partial` is training, or (``start-up``) Ray is starting its processes."""
    if moment == "training":
        return (partial / "events.jsonl").exists() and "train_start" in (
            partial / "events.jsonl"
        ).read_text()
    return any(
        p.info["name"] == "gcs_server" and _session(p) == session
        for p in psutil.process_iter(["name"])
    )


@pytest.mark.parametrize(
    ("backend", "signum", "moment"),
    [
        ("flower", signal.SIGINT, "training"),
        ("flower", signal.SIGTERM, "training"),
        ("inprocess", signal.SIGTERM, "training"),
        ("flower", signal.SIGINT, "start-up"),
        ("flower", signal.SIGTERM, "start-up"),
    ],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else None,
)
def test_ctrl_c_or_sigterm_marks_the_run_interrupted_and_leaves_no_process(
    tmp_path: Path, cache: Path, backend: str, signum: signal.Signals, moment: str
) -> None:
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    child = subprocess.Popen(
        simulate_command(backend, out, ENDLESS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        # its own process group, as a terminal's foreground job
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _reached(moment, partial, child.pid):
            assert child.poll() is None and time.monotonic() < deadline, (
                f"the run did not reach its {moment}"
            )
            time.sleep(0.5 if moment == "training" else 0.05)
        if moment == "training":
            time.sleep(3)  # the parties are training
        else:
            # the ServerApp still waits for Ray
            assert "parties" not in (partial / "events.jsonl").read_text()
        if signum == signal.SIGINT:
            # what Ctrl-C in a terminal does: the whole foreground group
            os.killpg(child.pid, signum)
        else:
            # what `kill PID` does: fedmerge alone, which must stop Ray itself
            os.kill(child.pid, signum)
        assert child.wait(timeout=60) == 128 + signum
    finally:
        for _ in range(20):  # Ray's daemons take a moment to exit after the signal
            time.sleep(0.5)
            left = [p for p in psutil.process_iter() if _session(p) == child.pid]
            if not left:
                break
        for process in left:
            process.kill()
        if child.poll() is None:
            child.kill()
    assert not left, [p.pid for p in left]
    assert not out.exists()  # a fresh --out stays absent: only a finished run replaces it
    record = json.loads((partial / "run.json").read_text())
    assert (record["status"], record["signal"]) == ("interrupted", signum.name)
    assert sorted(p.name for p in partial.iterdir()) == ["config.json", "events.jsonl", "run.json"]


def _session(process: psutil.Process) -> int | None:
    """The session id of a live process.

    None for one that is gone or a zombie awaiting its reaper.
    """
    try:
        return None if process.status() == psutil.STATUS_ZOMBIE else os.getsid(process.pid)
    except (OSError, psutil.Error):
        return None


class _HalfGrid:
    """A grid on which only the first message pushed is ever answered."""

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        return (
            [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"))]
            if "m0" in ids
            else []
        )


def test_a_stopped_grid_ends_its_wait_for_replies() -> None:
    stop = threading.Event()
    grid = server.app.StoppableGrid(_HalfGrid(), stop)  # type: ignore[arg-type]
    replies = grid.send_and_receive(["a", "b"], timeout=0.3)  # type: ignore[list-item]
    # the timeout ends it, with what arrived
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(FedmergeError, match="the run was interrupted"):
        grid.send_and_receive(["a", "b"], timeout=3600)  # type: ignore[list-item]
    assert time.monotonic() - started < 5
    with pytest.raises(FedmergeError, match="the run was interrupted"):
        grid.get_node_ids()
