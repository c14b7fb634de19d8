"""The federation's server loop, written once, over a transport that reaches the parties.

:func:`run_federation` is what the server does in every backend: send theta_0 to every party,
collect each party's reply separately, average the parties of a domain (FedAvg), merge the
domains (training-free initialisation, pseudo-users, learned coefficients), have every party
evaluate every model privately, and (``rounds > 1``) start again from the merged model.
A *transport* carries the two requests to the parties: :class:`InProcess` calls the party's
functions directly (the reference), ``server.app.FlowerTransport`` sends Flower messages.
A party that raises, times out or replies with unusable weights is left out of the round and
named in the results, as long as ``min_parties`` replied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console

from fedmerge.data.catalog import check_domain_name
from fedmerge.errors import FedmergeError
from fedmerge.merge.run import read_weights
from fedmerge.merge.vectors import StateDict
from fedmerge.protocol import (
    FederationConfig,
    MergeOutcome,
    PartySpec,
    TrainReply,
    average_parties,
    base_weights,
    check_reply,
    domain_rows,
    party_data,
    party_evaluate,
    party_specs,
    party_train,
    server_merge,
)
from fedmerge.runs.results import Row
from fedmerge.runs.rundir import RunDir, report_text
from fedmerge.train.loop import Part

Metrics = dict[str, dict[str, float]]
"""A party's evaluation of one model: {split: {metric: value}}."""


class Transport(Protocol):
    """How the server reaches the parties. Each call returns one result per party: a value or the error."""

    def describe(self) -> dict[int, dict[str, float | str] | Exception]:
        """Each party's domain name and catalogue size (``query``)."""
        ...

    def train(self, start: StateDict, round_: int) -> dict[int, TrainReply | Exception]:
        """Every party fine-tunes from `start` and replies."""
        ...

    def evaluate(self, models: dict[str, StateDict]) -> dict[int, dict[str, Metrics] | Exception]:
        """Every party evaluates every model of `models` (label -> weights) on its private splits."""
        ...


class InProcess:
    """The parties as plain function calls in this process (each loads its own private data once)."""

    def __init__(self, config: FederationConfig, quiet: bool = True) -> None:
        self.config, self.quiet = config, quiet
        self.specs = party_specs(config)
        self._parts: dict[int, Part] = {}

    def part(self, spec: PartySpec) -> Part:
        if spec.party not in self._parts:
            self._parts[spec.party] = party_data(spec, self.config, self.quiet)
        return self._parts[spec.party]

    def _each(self, call: Callable[[PartySpec], object]) -> dict[int, object]:
        results: dict[int, object] = {}
        for spec in self.specs:
            try:
                results[spec.party] = call(spec)
            except Exception as err:  # noqa: BLE001 - a failing party is reported, not fatal
                results[spec.party] = err
        return results

    def describe(self) -> dict[int, dict[str, float | str] | Exception]:
        return self._each(lambda s: {"domain": s.domain, "n_items": float(self.part(s).domain.n_items),
                                     "text_dim": float(self.part(s).features.shape[1])})  # type: ignore[return-value]

    def train(self, start: StateDict, round_: int) -> dict[int, TrainReply | Exception]:
        return self._each(lambda s: party_train(self.part(s), start, self.config, self.quiet))  # type: ignore[return-value]

    def evaluate(self, models: dict[str, StateDict]) -> dict[int, dict[str, Metrics] | Exception]:
        return self._each(lambda s: {label: party_evaluate(self.part(s), weights, self.config)  # type: ignore[return-value]
                                     for label, weights in models.items()})


@dataclass
class RoundResult:
    """One merging round: the rows of every model, the merge, and who was left out."""

    round: int
    rows: list[Row]
    merge: MergeOutcome
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_federation(config: FederationConfig, base: StateDict, transport: Transport,
                   log: Callable[..., None] = lambda event, **fields: None) -> list[RoundResult]:
    """Run ``config.rounds`` merging rounds from `base`; `log(event, **fields)` receives progress events."""
    specs = {s.party: s for s in party_specs(config)}
    need = config.min_parties or len(specs)
    results, start = [], base
    for round_ in range(1, config.rounds + 1):
        failed: dict[str, str] = {}
        began = time.perf_counter()
        log("train_start", round=round_, parties=len(specs))
        replies: dict[int, TrainReply] = {}
        for party, reply in sorted(transport.train(start, round_).items()):
            name = _party_name(specs[party])
            try:
                if isinstance(reply, Exception):
                    raise reply
                if reply.domain != specs[party].domain:
                    raise FedmergeError(f"{name} replied for domain {reply.domain!r}")
                check_reply(reply, start, name)
                replies[party] = reply
            except Exception as err:  # noqa: BLE001 - reported and left out
                failed[name] = f"{type(err).__name__}: {err}"
                log("party_failed", round=round_, party=name, error=failed[name])
        _enough(len(replies), need, len(specs), failed)
        trained = time.perf_counter()
        log("train_done", round=round_, replied=len(replies), seconds=round(trained - began, 2),
            train_seconds={_party_name(specs[p]): round(r.metrics["train_seconds"], 2) for p, r in replies.items()})
        domains = [d for d in config.domains if any(specs[p].domain == d for p in replies)]
        per_domain = [average_parties([r for p, r in sorted(replies.items()) if specs[p].domain == d]) for d in domains]
        log("merge_start", round=round_, domains=domains)
        outcome = server_merge(start, per_domain, config.model, config.seed, config.merge, quiet=True)
        merged_at = time.perf_counter()
        log("merge_done", round=round_, seconds=round(outcome.seconds, 2), weights=outcome.coefficients["weights"])
        models = {"theta_0" if round_ == 1 else f"start of round {round_}": start}
        models |= {f"fine-tuned on {r.domain}": r.weights for r in per_domain}
        models |= {f"{config.merge.method} (training-free)": outcome.initial, _merged_label(config): outcome.merged}
        evaluations = transport.evaluate(models)
        rows: list[Row] = []
        usable = []
        for party, value in sorted(evaluations.items()):
            if isinstance(value, Exception):
                failed.setdefault(_party_name(specs[party]), f"evaluation: {type(value).__name__}: {value}")
                log("party_failed", round=round_, party=_party_name(specs[party]), error=str(value))
            else:
                usable.append((specs[party], value))
        for label in models:
            rows += [r | {"round": round_} for r in domain_rows(label, [(s, v[label]) for s, v in usable])]
        done = time.perf_counter()
        seconds = {"train": round(trained - began, 2), "merge": round(merged_at - trained, 2),
                   "evaluate": round(done - merged_at, 2)}
        log("round_done", round=round_, seconds=seconds, failed=failed)
        results.append(RoundResult(round_, rows, outcome, failed, seconds))
        start = outcome.merged
    return results


def _merged_label(config: FederationConfig) -> str:
    learn = config.merge.learn
    return f"{config.merge.method} (training-free)" if learn.mode == "none" else f"merged ({learn.mode}, {learn.loss})"


def _party_name(spec: PartySpec) -> str:
    return spec.domain if spec.shards == 1 else f"{spec.domain}/{spec.shard}"


def _enough(replied: int, need: int, total: int, failed: dict[str, str]) -> None:
    if replied < need:
        reasons = "; ".join(f"{name}: {why}" for name, why in failed.items())
        raise FedmergeError(f"only {replied} of {total} parties replied, fewer than min_parties = {need} ({reasons}); "
                            "fix the failing parties or lower min_parties")


def execute(config: FederationConfig, transport: Transport, run: RunDir) -> list[RoundResult]:
    """The whole run on `transport`: ask the parties who they are, build theta_0, run the rounds, write results.

    The caller sets the final status of `run` (see :func:`simulate`).
    """
    described = transport.describe()
    broken = {p: v for p, v in described.items() if isinstance(v, Exception)}
    if broken:
        party, err = next(iter(broken.items()))
        raise FedmergeError(f"party {party} could not load its data: {err}")
    text_dims = {int(v["text_dim"]) for v in described.values()}  # type: ignore[index]
    run.log("parties", parties={p: f"{v['domain']} ({int(v['n_items']):,} items)"  # type: ignore[index]
                                for p, v in sorted(described.items())})
    base = read_weights(Path(config.base)) if config.base else base_weights(config, text_dims.pop())
    results = run_federation(config, base, transport, run.log)
    last = results[-1]
    rows = [r for result in results for r in result.rows]
    facts = {"domains": ", ".join(config.domains), "parties": config.n_parties, "rounds": config.rounds,
             "merge": f"{config.merge.method} {config.merge.params or ''} + {config.merge.learn.mode} "
                      f"({config.merge.learn.loss}, {config.merge.learn.steps} steps)",
             "base": config.base or f"seeded (seed {config.seed})",
             "seconds per round (train / merge / evaluate)": [r.seconds for r in results],
             "parties left out": {f"round {r.round}": r.failed for r in results if r.failed} or "none",
             "machine": run.status["machine"]}
    coefficients = last.merge.coefficients | {"merge_seconds": round(last.merge.seconds, 2),
                                              "teacher_bytes": last.merge.teacher_bytes}
    run.write_results(rows, last.merge.merged, coefficients, report_text("fedmerge simulate", rows, facts))
    return results


def simulate(config: FederationConfig, transport: Transport | Callable[[RunDir], list[RoundResult]], out: Path,
             console: Console | None = None) -> list[RoundResult] | None:
    """Run `config` into the run directory `out` and set its final status (``complete``, ``failed``, ``interrupted``).

    `transport` is a :class:`Transport` (the run happens here), or a callable that runs
    :func:`execute` itself, given the run directory (the Flower backend, whose ServerApp does).
    """
    if not config.domains:
        raise FedmergeError("no domains given; pass --domains A,B (registered names, see `fedmerge data list`)")
    for name in config.domains:
        check_domain_name(name)
    run = RunDir(out, {"federation": config.model_dump()}, console)
    try:
        results = transport(run) if callable(transport) else execute(config, transport, run)
    except KeyboardInterrupt:
        run.finish("interrupted")
        raise
    except Exception as err:
        run.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    run.finish("complete", failed={f"round {r.round}": r.failed for r in results if r.failed})
    return results
