"""The federation's server loop, written once, over a transport that reaches the parties.

:class:`Server` is what the server does in every backend: check each party's training reply
separately, average the parties of a domain (FedAvg), merge the domains (training-free
initialisation, pseudo-users, learned coefficients), and turn the parties' private
evaluations of every model into rows; ``rounds > 1`` starts again from the merged model.
A *transport* carries the requests: :class:`InProcess` calls the party's functions directly
(the reference), ``server.app`` sends Flower messages and calls the same :class:`Server` steps
from its strategy. A party that raises, times out or replies with unusable weights is left
out of the round and named in the results, as long as ``min_parties`` replied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, cast

import numpy as np
import torch
from rich.console import Console

from fedmerge.data.catalog import check_domain_name
from fedmerge.errors import FedmergeError
from fedmerge.merge.run import read_weights
from fedmerge.merge.server import Judge, Member, MergeOutcome, server_merge
from fedmerge.merge.vectors import StateDict
from fedmerge.models import Part, Recommender, build_model, load_parts
from fedmerge.privacy import BudgetExhausted, Ledger, noise_generator
from fedmerge.protocol import (
    Description,
    Evaluation,
    FederationConfig,
    PartySpec,
    TrainReply,
    average_parties,
    base_weights,
    check_description,
    check_reply,
    describe,
    domain_rows,
    fine_tuned,
    party_data,
    party_evaluate,
    party_leg,
    party_specs,
    party_train,
    repliers,
)
from fedmerge.runs.results import Row
from fedmerge.runs.rundir import RunDir, report_text
from fedmerge.train.legs import Carry
from fedmerge.weaving import Leg
from fedmerge.woven import WovenTransport, woven_run

T = TypeVar("T")
K = TypeVar("K", str, int)
Log = Callable[..., None]
"""Records one event of the run: ``log(event, **fields)``.

See :meth:`fedmerge.runs.rundir.RunDir.log`.
"""


def _silent(event: str, **fields: object) -> None:
    """A log that records nothing."""


class Transport(Protocol):
    """How the server reaches the parties."""

    def describe(self, log: Log) -> dict[int, Description | Exception]:
        """Each party's description and item table (``query``): a value or the error.

        Each party that is ready is logged as it replies (:func:`log_ready`), where the transport
        sees it.
        """
        ...

    def run_rounds(self, base: StateDict, server: Server) -> list[RoundResult]:
        """Every round: parties train, `server` accepts and merges, parties evaluate.

        The parties train from the round's start.
        """
        ...


class InProcess:
    """The parties as plain function calls in this process.

    Each party loads its own private data once.
    """

    def __init__(self, config: FederationConfig, quiet: bool = True) -> None:
        self.config, self.quiet = config, quiet
        self.specs = party_specs(config)
        self._parts: dict[int, Part] = {}
        self._domains: dict[str, Part] = {}
        # each party's privacy ledger, kept for the whole run
        self.ledgers: dict[int, Ledger] = {s.party: Ledger() for s in self.specs}
        # the run's log while it runs: each party's reply is logged as it comes
        self.log: Log = _silent
        self.round = 0

    def part(self, spec: PartySpec) -> Part:
        """The party's data (each domain is loaded once and shared by its shards' parties)."""
        if spec.party not in self._parts:
            if spec.domain not in self._domains:
                self._domains[spec.domain] = load_parts(
                    [spec.domain], self.config.model, self.quiet
                )[0]
            self._parts[spec.party] = party_data(
                spec, self.config, whole=self._domains[spec.domain]
            )
        return self._parts[spec.party]

    def _each(
        self,
        call: Callable[[PartySpec], T],
        report: Callable[[PartySpec, T, float], None] | None = None,
        domains: set[str] | None = None,
    ) -> dict[int, T | Exception]:
        """`call` for every party (of `domains`; None: all): its value or its error.

        `report` (spec, value, seconds) follows each value.
        """
        results: dict[int, T | Exception] = {}
        for spec in self.specs:
            if domains is not None and spec.domain not in domains:
                continue
            began = time.perf_counter()
            try:
                results[spec.party] = value = call(spec)
            except Exception as err:  # noqa: BLE001 - a failing party is reported, not fatal
                results[spec.party] = err
                continue
            if report is not None:
                report(spec, value, time.perf_counter() - began)
        return results

    def describe(self, log: Log = _silent) -> dict[int, Description | Exception]:
        """Each party's description and item table, logged as it is ready."""
        return self._each(
            lambda s: describe(s, self.part(s)),
            lambda s, value, seconds: log_ready(log, s, value),
        )

    def train(self, start: StateDict) -> dict[int, TrainReply | Exception]:
        """Every party fine-tunes from `start`.

        When the privacy mechanism hides the parties of a domain, each domain's replies are
        summed here, on the parties' side, and the server gets the aggregate only, as the reply
        of the domain's first party (a domain with a failed party fails as a whole).
        """
        replies = self._each(
            lambda s: party_train(
                self.part(s), start, self.config, self.quiet, self.ledgers[s.party], s.party
            ),
            lambda s, reply, seconds: log_trained(self.log, self.round, s, reply.metrics),
        )
        if not self.config.mechanism().hides_parties:
            return replies
        aggregates: dict[int, TrainReply | Exception] = {}
        for leader in repliers(self.config):
            own = [replies[s.party] for s in self.specs if s.domain == leader.domain]
            failed = [r for r in own if isinstance(r, Exception)]
            aggregates[leader.party] = failed[0] if failed else average_parties(own)  # type: ignore[arg-type]
        return aggregates

    def evaluate(
        self,
        models: dict[K, StateDict],
        splits: tuple[str, ...] | None = None,
        sample: bool = False,
        domains: set[str] | None = None,
    ) -> dict[int, dict[K, Evaluation] | Exception]:
        """Every party (of `domains`; None: all) evaluates every model of `models` on `splits`.

        `models` maps a label to weights.
        """
        return self._each(
            lambda s: {
                label: party_evaluate(self.part(s), weights, self.config, splits, sample)
                for label, weights in models.items()
            },
            lambda s, value, seconds: log_evaluated(
                self.log, self.round, s, len(models), seconds, sample
            ),
            domains,
        )

    def legs(self, start: StateDict, requests: list[tuple[Leg, Carry]]) -> list[Carry]:
        """One tick of woven legs, each at its domain's party (one party per domain)."""
        weaving = self.config.weaving()
        if weaving is None:
            raise FedmergeError("legs belong to a woven run; set target and sources")
        at = {s.domain: s for s in self.specs}
        return [
            party_leg(self.part(at[leg.domain]), start, self.config, weaving, leg, carry)
            for leg, carry in requests
        ]

    def run_rounds(self, base: StateDict, server: Server) -> list[RoundResult]:
        """Every round from `base`: the parties train, `server` merges, the parties evaluate."""
        start, self.log = base, server.log
        for round_ in range(1, self.config.rounds + 1):
            self.round = round_
            server.begin(round_)
            try:
                replies = server.accept(round_, start, self.train(start))
            except BudgetExhausted:
                break  # the rounds so far stand (Server.accept recorded why)

            def judge(candidates: list[StateDict], round_: int = round_) -> list[float]:
                return server.valid_scores(
                    round_, self.evaluate(dict(enumerate(candidates)), ("valid",), sample=True)
                )

            outcome, models = server.merge(round_, start, replies, judge)
            server.evaluating(round_, list(models))
            server.record(round_, list(models), self.evaluate(models))
            start = outcome.merged
        return server.results


def log_ready(log: Log, spec: PartySpec, described: Description) -> None:
    """A party has loaded its data and said who it is (its ``describe`` reply)."""
    log("party_ready", party=party_name(spec), domain=spec.domain, n_items=float(described.n_items))


def log_trained(log: Log, round_: int, spec: PartySpec, metrics: dict[str, float]) -> None:
    """A party's training reply arrived: its metrics as sent.

    Epochs, last loss, best valid ndcg@10, seconds...
    """
    log("party_trained", round=round_, party=party_name(spec), **metrics)


def log_evaluated(
    log: Log, round_: int, spec: PartySpec, models: int, seconds: float, sample: bool
) -> None:
    """A party's evaluation of `models` models arrived.

    ``sample``: candidate merges scored on its valid users.
    """
    log(
        "party_evaluated",
        round=round_,
        party=party_name(spec),
        models=models,
        valid_selection=sample,
        seconds=seconds,
    )


@dataclass
class RoundResult:
    """One merging round: the rows of every model, the merge, and who was left out."""

    round: int
    rows: list[Row]
    merge: MergeOutcome
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    """Where each party's guarantee stands after the round: {party: {epsilon, delta, noise}}."""


class Server:
    """The server's side of each round, step by step (the Flower strategy calls the same steps).

    :meth:`accept` checks the parties' training replies, :meth:`merge` averages each domain's
    parties and merges the domains, :meth:`record` turns the parties' evaluations into rows
    and closes the round. Parties left out are collected per round in ``failed``.
    """

    def __init__(
        self, config: FederationConfig, tables: dict[str, torch.Tensor], log: Log = _silent
    ) -> None:
        self.config, self.tables, self.log = config, tables, log
        self.specs = {s.party: s for s in party_specs(config)}
        self.repliers = [s.party for s in repliers(config)]
        hidden = len(self.repliers) < len(self.specs)
        self.need = len(self.repliers) if hidden else config.min_parties or len(self.specs)
        self.results: list[RoundResult] = []
        self.failed: dict[str, str] = {}
        self.clock: dict[str, float] = {}
        self.outcome: MergeOutcome | None = None
        self.mechanism = config.mechanism()
        self.ledger = Ledger()  # the server's, for a mechanism that releases at the server
        self.spent: dict[str, dict[str, float]] = {}
        self.stopped = ""  # why the run stopped before its last round

    def _model_at(self, start: StateDict) -> Recommender:
        """A model set to the round's `start`: its exchanged state is what updates are from."""
        width = next(iter(self.tables.values())).shape[1]
        model = build_model(self.config.model, width, self.config.seed)
        model.load_merged(start)
        return model

    def begin(self, round_: int) -> None:
        """The round starts: the start weights go out to the parties."""
        self.failed, self.clock, self.outcome = {}, {"start": time.perf_counter()}, None
        self.log("train_start", round=round_, parties=len(self.specs))

    def accept(
        self, round_: int, start: StateDict, raw: dict[int, TrainReply | Exception]
    ) -> dict[int, TrainReply]:
        """The usable training replies; the others are named in ``failed`` (too few: an error)."""
        replies: dict[int, TrainReply] = {}
        exhausted = [
            f"{party_name(self.specs[p])}: {err}"
            for p, err in sorted(raw.items())
            if isinstance(err, Exception) and BudgetExhausted.__name__ in f"{type(err)} {err}"
        ]
        if exhausted:
            self.stopped = (
                f"privacy budget exhausted before round {round_} ({'; '.join(exhausted)})"
            )
            self.log("budget_exhausted", round=round_, parties=exhausted)
            raise BudgetExhausted(self.stopped)
        begin = self._model_at(start).exchanged()
        for party, reply in sorted(raw.items()):
            name = party_name(self.specs[party])
            try:
                if isinstance(reply, Exception):
                    raise reply
                if reply.domain != self.specs[party].domain:
                    raise FedmergeError(f"{name} replied for domain {reply.domain!r}")
                check_reply(reply, begin, name)
                replies[party] = reply
                if "epsilon" in reply.metrics:
                    self.spent[name] = {k: reply.metrics[k] for k in ("epsilon", "delta", "noise")}
            except Exception as err:  # noqa: BLE001 - reported and left out
                self._fail(round_, name, f"{type(err).__name__}: {err}")
        for party in set(self.repliers) - raw.keys():
            self._fail(round_, party_name(self.specs[party]), "no reply (timed out)")
        if len(replies) < self.need:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.failed.items())
            raise FedmergeError(
                f"only {len(replies)} of {len(self.repliers)} parties replied, fewer than "
                f"min_parties = {self.need} ({reasons}); fix the failing parties or lower "
                "min_parties"
            )
        self.clock["trained"] = time.perf_counter()
        self.log(
            "train_done",
            round=round_,
            replied=len(replies),
            train_seconds={
                party_name(self.specs[p]): round(r.metrics["train_seconds"], 2)
                for p, r in replies.items()
            },
        )
        return replies

    def merge(
        self,
        round_: int,
        start: StateDict,
        replies: dict[int, TrainReply],
        judge: Judge | None = None,
    ) -> tuple[MergeOutcome, dict[str, StateDict]]:
        """FedAvg inside each domain, then the merge.

        Under a central privacy mechanism the merge is the server's noised aggregate of every
        party's update instead. Returns the merge and every model the parties evaluate (label ->
        weights).

        `judge` asks the parties to score candidate merges on valid
        (``merge.learn.valid_candidates``).
        """
        domains = [
            d for d in self.config.domains if any(self.specs[p].domain == d for p in replies)
        ]
        self.log("merge_start", round=round_, domains=domains)
        at = self._model_at(start)
        if self.mechanism.central:
            central = self._central(round_, domains, replies)
            per_domain, members = (
                [],
                [Member(central.domain, at.merge_update(central.update), self.tables[domains[0]])],
            )
        else:
            moved = {  # each party's update as the move of the merged weights
                p: TrainReply(r.domain, at.merge_update(r.update), r.metrics)
                for p, r in sorted(replies.items())
            }
            per_domain = [
                average_parties([r for p, r in moved.items() if self.specs[p].domain == d])
                for d in domains
            ]
            members = [Member(r.domain, r.update, self.tables[r.domain]) for r in per_domain]
        outcome = server_merge(
            start,
            members,
            self.config.model,
            self.config.seed,
            self.config.merge,
            quiet=False,
            # its bar: on a run's console only
            judge=judge,
            device=self.config.train.device,
        )
        self.clock["merged"] = time.perf_counter()
        self.log(
            "merge_done",
            round=round_,
            seconds=round(outcome.seconds, 2),
            weights=outcome.coefficients["weights"],
            selection=outcome.coefficients["selection"],
        )
        models = {"theta_0" if round_ == 1 else f"start of round {round_}": start}
        models |= {f"fine-tuned on {r.domain}": fine_tuned(start, r) for r in per_domain}
        models |= {
            f"{self.config.merge.method} (training-free)": outcome.initial,
            _merged_label(self.config): outcome.merged,
        }
        self.outcome = outcome
        return outcome, models

    def _central(
        self, round_: int, domains: list[str], replies: dict[int, TrainReply]
    ) -> TrainReply:
        """The server's noised aggregate of every party's update, as one member of the merge."""
        generator = noise_generator(self.config.privacy, self.config.seed, -1, round_)
        update = self.mechanism.aggregate(
            [r.update for _, r in sorted(replies.items())], self.ledger, generator
        )
        self.ledger.rounds += 1
        spent = self.mechanism.spent(self.ledger, len(self.specs))
        assert spent is not None  # a central mechanism spends
        self.spent["server"] = {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "noise": spent.noise_multiplier,
        }
        users = sum(r.metrics["users"] for r in replies.values())
        return TrainReply("+".join(domains), update, {"users": users})

    def evaluating(self, round_: int, labels: list[str]) -> None:
        """The parties are asked to evaluate the models `labels` on their private splits."""
        self.log(
            "evaluate_start",
            round=round_,
            models=labels,
            splits=list(self.config.splits),
            parties=len(self.specs),
        )

    def valid_scores(
        self, round_: int, evaluations: dict[int, dict[int, Evaluation] | Exception]
    ) -> list[float]:
        """Each candidate's mean valid ndcg@10 over the domains.

        From the parties' evaluations of candidates 0..n-1.
        """
        usable = self._usable(round_, evaluations, "valid selection")
        if not usable:
            raise FedmergeError(
                "no party scored the candidate merges on valid; see the failed parties in the "
                "event log"
            )
        return [
            float(
                np.mean([r["ndcg@10"] for r in domain_rows(str(i), [(s, v[i]) for s, v in usable])])
            )
            for i in range(len(usable[0][1]))
        ]

    def record(
        self,
        round_: int,
        labels: list[str],
        evaluations: dict[int, dict[str, Evaluation] | Exception],
    ) -> RoundResult:
        """Rows of every model on every domain from the parties' evaluations; closes the round."""
        usable = self._usable(round_, evaluations, "evaluation")
        rows = [
            r | {"round": round_}
            for label in labels
            for r in domain_rows(
                label, [(s, v[label]) for s, v in usable], self.config.train.evaluation.name()
            )
        ]
        now = time.perf_counter()
        seconds = {
            "train": round(self.clock["trained"] - self.clock["start"], 2),
            "merge": round(self.clock["merged"] - self.clock["trained"], 2),
            "evaluate": round(now - self.clock["merged"], 2),
        }
        self.log("round_done", round=round_, seconds=seconds, failed=self.failed)
        assert self.outcome is not None  # merge() came first in this round
        self.results.append(
            RoundResult(round_, rows, self.outcome, dict(self.failed), seconds, dict(self.spent))
        )
        return self.results[-1]

    def _usable(self, round_: int, evaluations: dict, step: str) -> list[tuple[PartySpec, dict]]:
        """The parties' evaluations that arrived, with their specs.

        The errors are named in ``failed``.
        """
        usable = []
        for party, value in sorted(evaluations.items()):
            if isinstance(value, Exception):
                self._fail(
                    round_,
                    party_name(self.specs[party]),
                    f"{step}: {type(value).__name__}: {value}",
                )
            else:
                usable.append((self.specs[party], value))
        return usable

    def _fail(self, round_: int, party: str, why: str) -> None:
        self.failed.setdefault(party, why)
        self.log("party_failed", round=round_, party=party, error=why)


def _merged_label(config: FederationConfig) -> str:
    learn = config.merge.learn
    return (
        f"{config.merge.method} (training-free)"
        if learn.mode == "none"
        else f"merged ({learn.mode}, {learn.loss})"
    )


def _kept(coefficients: dict) -> str:
    """Which learned coefficients the merge kept, and why."""
    selection = coefficients["selection"]
    if selection:
        scored = ", ".join(
            f"{_candidate_name(step, scale)}: {v:.4f}"
            for step, scale, v in zip(
                selection["steps"], selection["scales"], selection["scores"], strict=True
            )
        )
        chosen = _candidate_name(selection["chosen_step"], selection["chosen_scale"])
        return f"{chosen}, the best mean valid ndcg@10 of the parties ({scored})"
    if coefficients["learn"]["mode"] == "none":
        return "the training-free merge's (no learning)"
    return "the last step"


def _candidate_name(step: int, scale: float) -> str:
    return f"step {step}" + ("" if scale == 1.0 else f" x {scale:g}")


def party_name(spec: PartySpec) -> str:
    """How the run names a party.

    Its domain, or domain/shard when the domain is split across parties.
    """
    return spec.domain if spec.shards == 1 else f"{spec.domain}/{spec.shard}"


def execute(config: FederationConfig, transport: Transport, run: RunDir) -> list[RoundResult]:
    """The whole run on `transport`.

    Ask the parties who they are, build theta_0, run the rounds, write the results.

    The caller sets the final status of `run` (see :func:`simulate`).
    """
    run.log("data_start", domains=config.domains, shards=config.parties_per_domain)
    described = transport.describe(run.log)
    broken = {p: v for p, v in described.items() if isinstance(v, Exception)}
    if broken:
        party, err = next(iter(broken.items()))
        raise FedmergeError(f"party {party} could not load its data: {err}")
    parties = {p: v for p, v in described.items() if not isinstance(v, Exception)}
    for party, description in parties.items():
        check_description(description, f"party {party}")
    tables = {d.domain: d.table for d in parties.values()}
    run.log(
        "parties",
        parties={p: f"{d.domain} ({d.n_items:,} items)" for p, d in sorted(parties.items())},
    )
    width = next(iter(tables.values())).shape[1]
    base = read_weights(Path(config.base)) if config.base else base_weights(config, width)
    if config.switched_off:
        run.log("privacy", mechanism=config.privacy.mechanism, switched_off=config.switched_off)
    server = Server(config, tables, run.log)
    results = transport.run_rounds(base, server)
    if not results:
        raise BudgetExhausted(f"{server.stopped}; no round finished, so there are no results")
    last = results[-1]
    rows = [r for result in results for r in result.rows]
    facts = {
        "domains": ", ".join(config.domains),
        "parties": config.n_parties,
        "rounds": config.rounds,
        "merge": f"{config.merge.method} {config.merge.params or ''} + {config.merge.learn.mode} "
        f"({config.merge.learn.loss}, {config.merge.learn.steps} steps)",
        "base": config.base or f"seeded (seed {config.seed})",
        "coefficients kept": _kept(last.merge.coefficients),
        "seconds per round (train / merge / evaluate)": [r.seconds for r in results],
        "parties left out": {f"round {r.round}": r.failed for r in results if r.failed} or "none",
        "machine": run.status["machine"],
    }
    if server.stopped:
        facts["stopped early"] = f"{server.stopped}: the results of rounds 1-{last.round} stand"
        run.status["stopped early"] = facts["stopped early"]
    if config.privacy.mechanism != "none":
        facts["privacy"] = privacy_record(config, last.privacy)
        run.status["privacy"] = facts["privacy"]
    coefficients = last.merge.coefficients | {
        "merge_seconds": round(last.merge.seconds, 2),
        "teacher_bytes": last.merge.teacher_bytes,
    }
    run.write_results(
        rows, last.merge.merged, coefficients, report_text("fedmerge simulate", rows, facts)
    )
    return results


def execute_woven(
    config: FederationConfig, transport: WovenTransport, run: RunDir
) -> list[RoundResult]:
    """A woven run on `transport` (:mod:`fedmerge.woven`), as one round's result."""
    rows, outcome, seconds = woven_run(config, transport, run)
    return [RoundResult(1, rows, outcome, seconds=seconds)]


def privacy_record(config: FederationConfig, spent: dict[str, dict[str, float]]) -> dict:
    """What the run's privacy setting was and what it spent (for run.json and report.md).

    An infinite epsilon (noise multiplier 0: clipping only, no guarantee) is written as "inf",
    which JSON can hold.
    """
    mechanism = config.mechanism()
    return {
        "mechanism": config.privacy.mechanism,
        "clip": config.privacy.clip,
        "spent": {
            party: {k: v if np.isfinite(v) else str(v) for k, v in values.items()}
            for party, values in spent.items()
        },
        "record": mechanism.unit,
        "how": mechanism.how,
        "switched off": config.switched_off,
        "metrics": "the test metrics are the measurement and are released exactly, outside the "
        "guarantee; nothing else of a party's private data leaves it unprotected",
    }


def simulate(
    config: FederationConfig,
    transport: Transport | Callable[[RunDir], list[RoundResult]],
    out: Path,
    console: Console | None = None,
) -> list[RoundResult] | None:
    """Run `config` into the run directory `out` and set its final status.

    The status is ``complete``, ``failed`` or ``interrupted``.

    `transport` is a :class:`Transport` (the run happens here), or a callable that runs
    :func:`execute` itself, given the run directory (the Flower backend, whose ServerApp does).

    SIGTERM is handled like Ctrl-C while the run lasts: it raises ``KeyboardInterrupt("SIGTERM")``
    in the main thread (a real Ctrl-C raises one without arguments), the run is recorded as
    ``interrupted`` with the signal's name, and the exception goes on to the caller. This holds
    only where nothing else handles SIGTERM (in the main thread, with the default action): a
    deployed ServerApp process keeps Flower's own handler, which exits the process (`flwr stop`
    does so): that run is recorded as ``interrupted`` too. While the run record is being made,
    both signals wait, so a run is never left ``running`` by one.
    """
    import signal
    import threading

    if not config.domains:
        raise FedmergeError(
            "no domains given; pass --domains A,B (registered names, see `fedmerge data list`)"
        )
    for name in config.domains:
        check_domain_name(name)
    if config.base:
        # an unreadable base is refused before the run folder is made
        read_weights(Path(config.base))

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if ours:
        signal.signal(signal.SIGTERM, interrupt)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    run: RunDir | None = None
    try:
        run = RunDir(out, {"federation": config.model_dump()}, console)
        # a signal that came meanwhile is raised here
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if callable(transport):
            results = transport(run)
        elif config.target is not None:
            results = execute_woven(config, cast(WovenTransport, transport), run)
        else:
            results = execute(config, transport, run)
    except KeyboardInterrupt as err:
        if run is not None:
            run.finish("interrupted", signal=str(err.args[0]) if err.args else "SIGINT")
        raise
    except SystemExit as err:  # a deployed ServerApp's exit: Flower's handler of `flwr stop`
        if run is not None:
            run.finish("interrupted", signal=f"the process exited (code {err.code})")
        raise
    except Exception as err:
        if run is not None:
            run.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run.finish("complete", failed={f"round {r.round}": r.failed for r in results if r.failed})
    if run.screen is not None:
        run.screen.results([r for result in results for r in result.rows], run.out)
    return results
