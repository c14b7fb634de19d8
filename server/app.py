"""Flower ServerApp and the MergeRec strategy: thin wrappers over :class:`fedmerge.pipeline.Server`.

:class:`MergeRecStrategy` is a Flower ``Strategy`` (so Flower's wrappers can wrap it): its
``configure_*`` methods build the messages, its ``aggregate_*`` methods decode the replies and call
the very steps the in-process pipeline calls (accept, merge, record). ``Strategy.start`` runs the
rounds. :func:`server.simulation.flower_backend` runs it all in Flower's simulation runtime (Ray);
the module-level :data:`app` is the ServerApp of a deployed federation (SuperLink + SuperNodes,
``flwr run``), which reads its run config and writes the same run directory as ``fedmerge
simulate``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
    UserConfig,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from fedmerge.config import load_config
from fedmerge.errors import FedmergeError
from fedmerge.merge.vectors import StateDict
from fedmerge.pipeline import (
    Log,
    RoundResult,
    Server,
    execute,
    execute_woven,
    log_evaluated,
    log_ready,
    log_trained,
    simulate,
)
from fedmerge.privacy import BudgetExhausted
from fedmerge.protocol import (
    Description,
    EvaluateRequest,
    Evaluation,
    FederationConfig,
    TrainReply,
    party_specs,
    repliers,
)
from fedmerge.train.legs import Carry
from fedmerge.weaving import Leg
from server import secagg
from server.records import (
    evaluate_asked,
    evaluate_content,
    federation,
    leg_content,
    read_description,
    read_evaluations,
    read_leg,
    read_metrics,
    read_train_reply,
    sender,
    train_content,
)

if TYPE_CHECKING:
    from fedmerge.runs.rundir import RunDir


def by_node(requests: Iterable[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Each reply by the node its request went to.

    Flower's own error replies (a node that went offline, ...) come from the SuperLink, not from
    the node: only the request they answer names the node. A request's id is set when it is sent.
    """
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in requests}
    return {node_of[r.metadata.reply_to_message_id]: r for r in replies}


def _error(msg: Message | None) -> Exception:
    if msg is None:
        return RuntimeError("no reply")
    return RuntimeError(msg.error.reason if msg.has_error() else "empty reply")


class MergeRecStrategy(Strategy):
    """Send the round's start, receive each party's update, merge, evaluate every model everywhere.

    Each party's update is received separately, and the merge has learned coefficients. The
    ConfigRecords Flower hands ``configure_*`` travel in every request.
    """

    def __init__(
        self,
        config: FederationConfig,
        server: Server,
        nodes: dict[int, int],
        context: Context | None = None,
    ) -> None:
        self.config, self.server, self.nodes = config, server, nodes  # nodes: party id -> node id
        self.context = context  # the ServerApp's, for secure aggregation's legacy workflow
        self.hidden = config.mechanism().hides_parties
        self.party_of = {node: party for party, node in nodes.items()}
        self.start_weights: StateDict = {}
        self.models: dict[str, StateDict] = {}
        self.grid: Grid | None = None
        self.train_config = federation(config)
        self.requests: list[Message] = []
        """The requests of the last ``configure_*``, whose replies Flower hands ``aggregate_*``."""

    def _messages(self, content: RecordDict, kind: str, server_round: int) -> list[Message]:
        return [
            Message(
                content=content, message_type=kind, dst_node_id=node, group_id=str(server_round)
            )
            for node in self.nodes.values()
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The ``train`` messages of round `server_round`: the start weights, to every party."""
        self.start_weights, self.grid, self.train_config = (
            arrays.to_torch_state_dict(),
            grid,
            config,
        )
        self.server.begin(server_round)
        if self.hidden:  # the parties train inside secure aggregation (aggregate_train)
            return []
        self.requests = self._messages(train_content(arrays, config), "train", server_round)
        return self.requests

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Accept each party's update separately, then merge: the merged weights for the round.

        When the parties are hidden, each domain's parties train inside a SecAgg+ round and only
        the domain's aggregate is accepted.
        """
        raw: dict[int, TrainReply | Exception] = {}
        for node, msg in by_node(self.requests, replies).items():
            party = self.party_of[node]
            try:
                raw[party] = _error(msg) if msg.has_error() else read_train_reply(msg)
            except FedmergeError as err:
                raw[party] = err
        if self.hidden:
            raw = self._secure(server_round)
        accepted = self.server.accept(server_round, self.start_weights, raw)

        def judge(candidates: list[StateDict]) -> list[float]:
            assert self.grid is not None  # set by configure_train
            request = EvaluateRequest(candidates, ("valid",), sample=True)
            messages = self._messages(
                evaluate_content(self.train_config, request), "evaluate", server_round
            )
            replies = self.grid.send_and_receive(messages, timeout=60 * self.config.timeout_minutes)
            return self.server.valid_scores(
                server_round,
                self._evaluations(
                    by_node(messages, replies), list(range(len(candidates))), ("valid",)
                ),
            )

        outcome, self.models = self.server.merge(server_round, self.start_weights, accepted, judge)
        return ArrayRecord(outcome.merged), MetricRecord({"merge_seconds": outcome.seconds})

    def _evaluations(
        self, replies: dict[int, Message], labels: list, splits: tuple[str, ...]
    ) -> dict[int, dict[Any, Evaluation] | Exception]:
        """Each party's evaluations of the models sent, by `labels`, on `splits`; or its error.

        `replies` are by node (:func:`by_node`); the models were sent in the order of `labels`.
        """
        evaluations: dict[int, dict[Any, Evaluation] | Exception] = {}
        for node, msg in replies.items():
            party = self.party_of[node]
            try:
                evaluations[party] = (
                    _error(msg)
                    if msg.has_error()
                    else dict(zip(labels, read_evaluations(msg, len(labels), splits), strict=True))
                )
            except (KeyError, TypeError, ValueError) as err:
                evaluations[party] = FedmergeError(f"malformed reply ({type(err).__name__}: {err})")
        return evaluations

    def _secure(self, server_round: int) -> dict[int, TrainReply | Exception]:
        """Each domain's aggregate by SecAgg+, as the reply of its first party (or its error)."""
        assert self.grid is not None and self.context is not None  # set by configure_train
        raw: dict[int, TrainReply | Exception] = {}
        for leader in repliers(self.config):
            parties = [s.party for s in party_specs(self.config) if s.domain == leader.domain]
            try:
                mean, users, metrics = secagg.secure_mean(
                    self.grid,
                    self.context,
                    [self.nodes[p] for p in parties],
                    self.start_weights,
                    self.train_config,
                    server_round,
                    60 * self.config.timeout_minutes,
                )
            except FedmergeError as err:
                raw[leader.party] = err
                continue
            facts = list(metrics.values())
            raw[leader.party] = TrainReply(
                leader.domain,
                mean,
                {
                    "users": users,
                    "n_items": facts[0]["n_items"],
                    "parties": float(len(parties)),
                    "train_seconds": max(f["train_seconds"] for f in facts),
                },
            )
        return raw

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The ``evaluate`` messages: every model of the round, to every party."""
        self.server.evaluating(server_round, list(self.models))
        request = EvaluateRequest(list(self.models.values()), self.config.splits)
        self.requests = self._messages(evaluate_content(config, request), "evaluate", server_round)
        return self.requests

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record the parties' evaluations as the round's rows; the metrics say how many."""
        labels = list(self.models)
        result = self.server.record(
            server_round,
            labels,
            self._evaluations(by_node(self.requests, replies), labels, self.config.splits),
        )
        return MetricRecord({"rows": len(result.rows)})

    def summary(self) -> None:
        """Log the strategy's name, its number of parties and of rounds."""
        self.server.log(
            "strategy", name=type(self).__name__, parties=len(self.nodes), rounds=self.config.rounds
        )


def discover(grid: Grid, config: FederationConfig) -> tuple[dict[int, Description], dict[int, int]]:
    """Wait for every party's node and ask each who it is (``query``).

    Returns descriptions and node ids by party id.
    """
    deadline = time.monotonic() + 60 * config.timeout_minutes
    nodes: list[int] = []
    while len(nodes) < config.n_parties and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    if len(nodes) < config.n_parties:
        raise FedmergeError(
            f"only {len(nodes)} of {config.n_parties} parties connected within "
            f"{config.timeout_minutes} minutes; start more SuperNodes or lower the party count"
        )
    messages = [
        Message(
            content=RecordDict({"config": federation(config)}),
            message_type="query",
            dst_node_id=node,
            group_id="query",
        )
        for node in nodes
    ]
    found: dict[int, Description] = {}
    node_of: dict[int, int] = {}
    replies = grid.send_and_receive(messages, timeout=60 * config.timeout_minutes)
    for node, msg in by_node(messages, replies).items():
        if msg.has_error():
            raise FedmergeError(f"node {node} could not load its data: {msg.error.reason}")
        description = read_description(msg)
        found[description.party], node_of[description.party] = description, int(node)
    return found, node_of


class FlowerBackend:
    """The transport of a Flower run: the ServerApp's grid, driven by :class:`MergeRecStrategy`."""

    def __init__(
        self, grid: Grid, config: FederationConfig, context: Context | None = None
    ) -> None:
        self.grid, self.config, self.context = grid, config, context
        self.nodes: dict[int, int] = {}

    def describe(self, log: Log) -> dict[int, Description | Exception]:
        """Each party's description.

        A grid built with :func:`reply_logger` logs each one as it arrives.
        """
        found, self.nodes = discover(self.grid, self.config)
        return dict(found)

    def run_rounds(self, base: StateDict, server: Server) -> list[RoundResult]:
        """Every round, driven by Flower's strategy loop (:class:`MergeRecStrategy`)."""
        strategy = MergeRecStrategy(self.config, server, self.nodes, self.context)
        try:
            strategy.start(
                self.grid,
                ArrayRecord(base),
                num_rounds=self.config.rounds,
                timeout=60 * self.config.timeout_minutes,
                train_config=federation(self.config),
                evaluate_config=federation(self.config),
            )
        except BudgetExhausted:
            pass  # the rounds so far stand (Server.accept recorded why)
        return server.results


class FlowerWoven:
    """The transport of a woven run (:mod:`fedmerge.woven`) on the ServerApp's grid.

    ``train`` messages for every party's own adapter, ``train.leg`` for each tick's legs (one per
    party, at once), ``evaluate`` to the target's party; the server sees adapters, carries and
    aggregate metrics only.
    """

    def __init__(
        self, grid: Grid, config: FederationConfig, context: Context | None = None
    ) -> None:
        self.grid, self.config, self.context = grid, config, context
        self.specs = party_specs(config)
        self.nodes: dict[int, int] = {}

    def describe(self, log: Log) -> dict[int, Description | Exception]:
        """Each party's description."""
        found, self.nodes = discover(self.grid, self.config)
        return dict(found)

    def _send(self, kind: str, contents: dict[int, RecordDict], group: str) -> dict[int, Message]:
        """Send each party its content; its reply, by party (a party that did not reply: none)."""
        messages = [
            Message(content=c, message_type=kind, dst_node_id=self.nodes[p], group_id=group)
            for p, c in contents.items()
        ]
        party_of = {node: party for party, node in self.nodes.items()}
        replies = self.grid.send_and_receive(messages, timeout=60 * self.config.timeout_minutes)
        return {party_of[node]: m for node, m in by_node(messages, replies).items()}

    def train(self, start: StateDict) -> dict[int, TrainReply | Exception]:
        """Every party fine-tunes its own adapter from `start`."""
        content = train_content(ArrayRecord(start), federation(self.config))
        # group "1": the run's one round, so each party's reply is logged as it arrives
        replies = self._send("train", {s.party: content for s in self.specs}, "1")
        return {
            s.party: read_train_reply(msg)
            if (msg := replies.get(s.party)) is not None and not msg.has_error()
            else _error(msg)
            for s in self.specs
        }

    def legs(self, start: StateDict, requests: list[tuple[Leg, Carry]]) -> list[Carry]:
        """One tick's legs, each at its domain's party (who rebuilds the base `start` itself)."""
        at = {s.domain: s.party for s in self.specs}
        config = federation(self.config)
        replies = self._send(
            "train.leg",
            {at[leg.domain]: leg_content(config, leg, carry) for leg, carry in requests},
            "legs",
        )
        carries = []
        for leg, _ in requests:
            msg = replies.get(at[leg.domain])
            if msg is None or msg.has_error():
                raise FedmergeError(
                    f"the {leg.domain} party failed leg {leg.index} of {leg.hybrid}: {_error(msg)}"
                )
            carries.append(read_leg(msg)[1])
        return carries

    def evaluate(
        self,
        models: dict[str, StateDict],
        splits: tuple[str, ...] | None = None,
        sample: bool = False,
        domains: set[str] | None = None,
    ) -> dict[int, dict[str, Evaluation] | Exception]:
        """The parties of `domains` (None: all) evaluate every model on `splits`."""
        splits = splits or self.config.splits
        content = evaluate_content(
            federation(self.config), EvaluateRequest(list(models.values()), splits, sample)
        )
        parties = [s.party for s in self.specs if domains is None or s.domain in domains]
        replies = self._send("evaluate", dict.fromkeys(parties, content), "1")
        out: dict[int, dict[str, Evaluation] | Exception] = {}
        for party in parties:
            msg = replies.get(party)
            try:
                out[party] = (
                    _error(msg)
                    if msg is None or msg.has_error()
                    else dict(zip(models, read_evaluations(msg, len(models), splits), strict=True))
                )
            except (KeyError, TypeError, ValueError) as err:
                out[party] = FedmergeError(f"malformed reply ({type(err).__name__}: {err})")
        return out


def run_federation(
    config: FederationConfig, grid: Grid, context: Context | None, run: RunDir
) -> list[RoundResult]:
    """The whole run on the ServerApp's grid: the rounds, or a woven run."""
    if config.target is not None:
        return execute_woven(config, FlowerWoven(grid, config, context), run)
    return execute(config, FlowerBackend(grid, config, context), run)


Reporter = Callable[[Message, Message, float], None]
"""Called for every reply as it arrives: (request, reply, seconds since the request was sent)."""


class StoppableGrid:
    """A grid whose waits for replies end with an error once `stop` is set.

    It reports each reply as it arrives.

    In simulation the ServerApp runs in a thread of its own, and Ctrl-C reaches the main thread
    only: without this, the ServerApp would wait out its timeout for parties that are gone.
    `on_reply` (see :func:`reply_logger`) hears of each party's reply when it comes, not when the
    last party's does; `poll` is the pause between two pulls of the replies.
    """

    def __init__(
        self, grid: Grid, stop: threading.Event, on_reply: Reporter | None = None, poll: float = 0.1
    ) -> None:
        self.grid, self.stop, self.on_reply, self.poll = grid, stop, on_reply, poll

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped grid's."""
        return getattr(self.grid, name)

    def _check(self) -> None:
        if self.stop.is_set():
            raise FedmergeError("the run was interrupted")

    def get_node_ids(self) -> Iterable[int]:
        """The grid's node ids, unless the run was stopped."""
        self._check()
        return self.grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`; pull replies until all arrived, the run stops or `timeout` is up."""
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        requests, pending, sent = dict(zip(ids, messages, strict=False)), set(ids), time.monotonic()
        deadline = sent + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            self._check()
            arrived = list(self.grid.pull_messages(pending))
            replies += arrived
            pending -= {msg.metadata.reply_to_message_id for msg in arrived}
            for msg in arrived:
                if self.on_reply is not None and msg.metadata.reply_to_message_id in requests:
                    self.on_reply(
                        requests[msg.metadata.reply_to_message_id], msg, time.monotonic() - sent
                    )
            if pending:
                time.sleep(self.poll)
        return replies


def reply_logger(config: FederationConfig, log: Log) -> Reporter:
    """Logs each party's reply as it arrives: ready (``query``), trained (its metrics), evaluated.

    An error reply or a malformed one is not logged here: the server names the party when it
    takes in the round's replies (``party_failed``).
    """
    specs = {spec.party: spec for spec in party_specs(config)}

    def report(request: Message, reply: Message, seconds: float) -> None:
        if reply.has_error():
            return
        try:
            spec = specs[sender(reply)]
            kind = request.metadata.message_type
            if kind == "query":
                log_ready(log, spec, read_description(reply))
            elif kind == "train":
                log_trained(log, int(request.metadata.group_id), spec, read_metrics(reply))
            elif kind == "evaluate":
                models, sample = evaluate_asked(request)
                log_evaluated(log, int(request.metadata.group_id), spec, models, seconds, sample)
        except (FedmergeError, KeyError, TypeError, ValueError):
            return

    return report


def deployed_run(run_config: UserConfig) -> tuple[FederationConfig, Path]:
    """The federation config and run directory of a deployed run, from its flat Flower run config.

    Parameters
    ----------
    run_config : UserConfig
        ``[tool.flwr.app.config]`` plus the ``flwr run --run-config`` overrides: ``config`` (a
        preset in ``configs/`` or a TOML path; empty for the defaults), ``set`` (``key=value``
        overrides separated by ``;``, as ``fedmerge simulate --set``) and ``out`` (the run
        directory, relative to the ServerApp process's working directory).

    Returns
    -------
    tuple[FederationConfig, Path]
        The validated config and the run directory.
    """
    preset = str(run_config.get("config", "simulate")) or None
    overrides = [item.strip() for item in str(run_config.get("set", "")).split(";") if item.strip()]
    return load_config(preset, overrides, FederationConfig), Path(
        str(run_config.get("out", "runs/deployed"))
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation on the deployed SuperNodes and write the run directory.

    ``run.json`` says how it ended.
    """
    config, out = deployed_run(context.run_config)

    def run(run_dir: RunDir) -> list[RoundResult]:
        watched = StoppableGrid(
            grid, threading.Event(), reply_logger(config, run_dir.log), poll=1.0
        )
        # a Grid by delegation: StoppableGrid passes everything but the waits to `grid`
        return run_federation(config, cast(Grid, watched), context, run_dir)

    simulate(config, run, out, Console(markup=False))
