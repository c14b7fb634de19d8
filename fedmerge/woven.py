"""A woven run (WeaveRec in a federation): local adapters, woven hybrids, fusion and baselines.

Every party fine-tunes its own adapter from the base (the target-only adapter at the target, a
source-only adapter at each source); each source's hybrid is woven between the target and that
source (:mod:`fedmerge.weaving`); one adapter is FedAvg-trained over all the run's parties with
the same steps per party as weaving (``weave.visits`` rounds of ``weave.steps`` local steps,
averaged by users); the server fuses, with ``merge`` (equal weights: WeaveRec's released
setting), the target-only adapter and the hybrids (*woven*), and the target-only and source-only
adapters (*naive*). The target party evaluates every model on its private splits; the server
sees adapters, optimiser states of hybrids and aggregate metrics only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from fedmerge.data.download import cache_dir
from fedmerge.errors import FedmergeError
from fedmerge.files import write_json
from fedmerge.merge.server import Member, MergeConfig, MergeOutcome, server_merge
from fedmerge.merge.vectors import StateDict, combine, task_vector
from fedmerge.models import build_model
from fedmerge.protocol import (
    Description,
    Evaluation,
    FederationConfig,
    PartySpec,
    TrainReply,
    base_weights,
    check_description,
    domain_rows,
)
from fedmerge.runs.results import Row
from fedmerge.runs.rundir import RunDir, report_text
from fedmerge.train.checkpoint import read_state, save_weights
from fedmerge.train.legs import Carry
from fedmerge.weaving import Leg, WeaveConfig, hybrid_legs, hybrid_name, weave


@runtime_checkable
class WovenTransport(Protocol):
    """What a woven run needs of a backend."""

    specs: list[PartySpec]

    def describe(self, log: Callable[..., None]) -> dict[int, Description | Exception]:
        """Each party's description and item table."""
        ...

    def train(self, start: StateDict) -> dict[int, TrainReply | Exception]:
        """Every party fine-tunes its own adapter from `start`."""
        ...

    def legs(self, start: StateDict, requests: list[tuple[Leg, Carry]]) -> list[Carry]:
        """One tick's legs, each at its domain's party."""
        ...

    def evaluate(
        self,
        models: dict[str, StateDict],
        splits: tuple[str, ...] | None = None,
        sample: bool = False,
        domains: set[str] | None = None,
    ) -> dict[int, dict[str, Evaluation] | Exception]:
        """The parties of `domains` (None: every party) evaluate every model."""
        ...


def woven_run(
    config: FederationConfig, transport: WovenTransport, run: RunDir
) -> tuple[list[Row], MergeOutcome, dict[str, float]]:
    """The whole woven run on `transport` (see the module docstring).

    Its rows, the woven merge and the seconds of each step.

    The caller sets the final status of `run`.
    """
    weaving = config.weaving()
    if weaving is None:
        raise FedmergeError("a woven run needs a target and sources; set target and sources")
    clock = {"start": time.perf_counter()}
    run.log("data_start", domains=config.domains, shards=1)
    described = transport.describe(run.log)
    broken = {p: v for p, v in described.items() if isinstance(v, Exception)}
    if broken:
        party, err = next(iter(broken.items()))
        raise FedmergeError(f"party {party} could not load its data: {err}")
    tables: dict[str, torch.Tensor] = {}
    for party, description in described.items():
        assert not isinstance(description, Exception)
        check_description(description, f"party {party}")
        tables[description.domain] = description.table
    width = tables[weaving.target].shape[1]
    base = base_weights(config, width)
    skeleton = build_model(config.model, width, config.seed)
    skeleton.load_merged(base)
    begin = skeleton.exchanged()

    run.log("weave_local_start", parties=len(transport.specs))
    replies = _replies(transport.train(base))
    local = {
        domain: combine(base, [skeleton.merge_update(reply.update)], [1.0])
        for domain, reply in replies.items()
    }
    clock["local"] = time.perf_counter()
    run.log(
        "weave_hybrids_start",
        hybrids=[hybrid_name(weaving.target, s) for s in weaving.sources],
        legs=2 * weaving.visits,
        steps=weaving.steps,
    )
    keys = {s: _hybrid_key(config, weaving, s, tables) for s in weaving.sources}
    kept = {s: _cached(keys[s]) for s in weaving.sources} if weaving.reuse else {}
    reused = {hybrid_name(weaving.target, s): c for s, c in kept.items() if c is not None}
    todo = [s for s in weaving.sources if hybrid_name(weaving.target, s) not in reused]
    if reused:
        run.log("weave_reused", hybrids=list(reused), keys=[keys[s] for s in kept if s not in todo])
    woven_now = (
        weave(
            begin, weaving.model_copy(update={"sources": todo}), lambda t: transport.legs(base, t)
        )
        if todo
        else {}
    )
    if weaving.reuse:
        for source in todo:
            _keep(keys[source], woven_now[hybrid_name(weaving.target, source)])
    hybrids = {
        name: reused.get(name) or woven_now[name]
        for name in (hybrid_name(weaving.target, s) for s in weaving.sources)
    }
    clock["woven"] = time.perf_counter()
    run.log("weave_fedavg_start", rounds=weaving.visits, parties=len(transport.specs))
    users = {domain: reply.metrics["users"] for domain, reply in replies.items()}
    fedavg = _fedavg(weaving, transport, base, begin, users)
    clock["fedavg"] = time.perf_counter()

    def at(carry: Carry) -> StateDict:
        return combine(base, [skeleton.merge_update(task_vector(begin, carry.weights))], [1.0])

    target_only = local[weaving.target]
    woven = _fuse(
        config,
        base,
        {weaving.target: target_only} | {name: at(carry) for name, carry in hybrids.items()},
        tables[weaving.target],
    )
    naive = _fuse(config, base, local, tables[weaving.target])
    clock["fused"] = time.perf_counter()
    learn = config.merge.learn.mode
    fusion = config.merge.method + ("" if learn == "none" else f" + {learn}")
    models = {
        "theta_0": base,
        f"target-only ({weaving.target})": target_only,
        **{f"source-only ({s})": local[s] for s in weaving.sources},
        "naive merge (target-only + source-only)": naive.merged,
        "fedavg (all parties)": at(fedavg),
        **{f"hybrid {name}": at(carry) for name, carry in hybrids.items()},
        f"woven merge ({fusion})": woven.merged,
    }
    run.log("weave_evaluate_start", models=list(models), target=weaving.target)
    evaluations = transport.evaluate(models, domains={weaving.target})
    usable = [
        (spec, value)
        for spec in transport.specs
        if spec.domain == weaving.target
        and not isinstance(value := evaluations[spec.party], Exception)
    ]
    if not usable:
        raise FedmergeError(f"the target party ({weaving.target}) could not evaluate the models")
    protocol = config.train.evaluation.name()
    rows = [
        r
        for label in models
        for r in domain_rows(label, [(s, v[label]) for s, v in usable], protocol)
    ]
    now = time.perf_counter()
    seconds = {
        "local adapters": round(clock["local"] - clock["start"], 2),
        "weaving": round(clock["woven"] - clock["local"], 2),
        "fedavg": round(clock["fedavg"] - clock["woven"], 2),
        "fusion": round(clock["fused"] - clock["fedavg"], 2),
        "evaluation": round(now - clock["fused"], 2),
    }
    run.log("weave_done", seconds=seconds)
    facts = {
        "target": weaving.target,
        "sources": ", ".join(weaving.sources),
        "weaving": f"{weaving.visits} legs of {weaving.steps} steps at each party of each "
        f"hybrid, {weaving.first} first, seed {weaving.seed}",
        "fusion": f"{fusion} {config.merge.params or ''}",
        "seconds": seconds,
        "machine": run.status["machine"],
    }
    run.write_results(
        rows,
        woven.merged,
        woven.coefficients,
        report_text("fedmerge simulate (woven)", rows, facts),
    )
    return rows, woven, seconds


def _hybrid_key(
    config: FederationConfig, weaving: WeaveConfig, source: str, tables: dict[str, torch.Tensor]
) -> str:
    """What a hybrid depends on: its pair, its legs in order, the settings, the item tables."""
    pair = sorted([weaving.target, source])
    facts = {
        "legs": [(leg.domain, leg.visit) for leg in hybrid_legs(weaving, source)],
        "steps": weaving.steps,
        "weave seed": weaving.seed,
        "seed": config.seed,
        "model": config.model.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"),
        "tables": {d: hashlib.sha256(tables[d].cpu().numpy().tobytes()).hexdigest() for d in pair},
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _cached(key: str) -> Carry | None:
    """The hybrid kept under `key` in the server's cache, or None."""
    folder = cache_dir() / "hybrids"
    if not (folder / f"{key}.json").exists():
        return None
    tensors = read_state(folder / f"{key}.safetensors")
    part = {
        p: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{p}.")}
        for p in ("weights", "moments")
    }
    step = int(json.loads((folder / f"{key}.json").read_text())["step"])
    return Carry(part["weights"], part["moments"], step)


def _keep(key: str, carry: Carry) -> None:
    """Keep a woven hybrid under `key` (the tensors first, then the record that completes it)."""
    folder = cache_dir() / "hybrids"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"weights.{k}": v for k, v in carry.weights.items()}
    save_weights(
        tensors | {f"moments.{k}": v for k, v in carry.moments.items()},
        folder / f"{key}.safetensors",
    )
    write_json(
        folder / f"{key}.json", {"step": carry.step, "woven": time.strftime("%Y-%m-%d %H:%M:%S")}
    )


def _replies(replies: dict[int, TrainReply | Exception]) -> dict[str, TrainReply]:
    """Each domain's reply; a failed party fails the run (every adapter is needed)."""
    out = {}
    for party, reply in sorted(replies.items()):
        if isinstance(reply, Exception):
            raise FedmergeError(f"party {party} failed to train its adapter: {reply}")
        out[reply.domain] = reply
    return out


def _fedavg(
    weaving: WeaveConfig,
    transport: WovenTransport,
    base: StateDict,
    begin: StateDict,
    users: dict[str, float],
) -> Carry:
    """One adapter FedAvg-trained over every party: per round, one leg each, averaged by users.

    Each round's legs start a fresh optimiser from the round's average (plain FedAvg).
    """
    carry = Carry(dict(begin), {})
    for round_ in range(weaving.visits):
        legs = [Leg("fedavg", s.domain, round_, round_) for s in transport.specs]
        after = transport.legs(base, [(leg, carry) for leg in legs])
        total = sum(users[leg.domain] for leg in legs)
        weights = {k: torch.zeros_like(v) for k, v in begin.items()}
        for leg, reached in zip(legs, after, strict=True):
            for k in weights:
                weights[k] += users[leg.domain] / total * reached.weights[k]
        carry = Carry(weights, {}, carry.step + weaving.steps)
    return carry


def _fuse(
    config: FederationConfig, base: StateDict, adapters: dict[str, StateDict], table: torch.Tensor
) -> MergeOutcome:
    """``merge`` of `adapters` (merge space) from `base`, every member on the target's table."""
    members = [Member(name, task_vector(base, w), table) for name, w in adapters.items()]
    merge: MergeConfig = config.merge
    return server_merge(base, members, config.model, config.seed, merge, quiet=True)
