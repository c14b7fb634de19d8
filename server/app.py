"""Flower ServerApp and the MergeRec strategy: thin wrappers over :class:`fedmerge.pipeline.Server`.

:class:`MergeRecStrategy` is a Flower ``Strategy`` (so Flower's wrappers can wrap it): its
``configure_*`` methods build the messages, its ``aggregate_*`` methods decode the replies and
call the very steps the in-process pipeline calls (accept, merge, record). ``Strategy.start``
runs the rounds. :func:`server.simulation.flower_backend` runs it all in Flower's simulation runtime (Ray); the
module-level :data:`app` is the ServerApp of a deployed federation (SuperLink + SuperNodes,
``flwr run``), which reads its run config and writes the same run directory as ``fedmerge simulate``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict, UserConfig
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from fedmerge.config import load_config
from fedmerge.errors import FedmergeError
from fedmerge.merge.vectors import StateDict
from fedmerge.pipeline import (
    Log,
    Metrics,
    RoundResult,
    Server,
    execute,
    log_evaluated,
    log_ready,
    log_trained,
    simulate,
)
from fedmerge.protocol import FederationConfig, TrainReply, party_specs


def _error(msg: Message) -> Exception:
    return RuntimeError(msg.error.reason if msg.has_error() else "empty reply")


def train_reply(msg: Message) -> TrainReply:
    """The protocol value of a party's training reply."""
    features = msg.content["features"].to_torch_state_dict()["features"]
    metrics = {k: float(v) for k, v in msg.content["metrics"].items()}  # type: ignore[arg-type]
    return TrainReply(str(msg.content["party"]["domain"]), msg.content["arrays"].to_torch_state_dict(), features, metrics)


class MergeRecStrategy(Strategy):
    """Send theta_0, receive each party separately, merge with learned coefficients, evaluate every model everywhere."""

    def __init__(self, config: FederationConfig, server: Server, nodes: dict[int, int]) -> None:
        self.config, self.server, self.nodes = config, server, nodes  # nodes: party id -> node id
        self.party_of = {node: party for party, node in nodes.items()}
        self.federation = json.dumps(config.model_dump())
        self.start_weights: StateDict = {}
        self.models: dict[str, StateDict] = {}
        self.grid: Grid | None = None

    def _messages(self, content: RecordDict, kind: str, server_round: int) -> list[Message]:
        return [Message(content=content, message_type=kind, dst_node_id=node, group_id=str(server_round))
                for node in self.nodes.values()]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.start_weights, self.grid = arrays.to_torch_state_dict(), grid
        self.server.begin(server_round)
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"federation": self.federation})})
        return self._messages(content, "train", server_round)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raw: dict[int, TrainReply | Exception] = {}
        for msg in replies:
            party = self.party_of[msg.metadata.src_node_id]
            try:
                raw[party] = _error(msg) if msg.has_error() else train_reply(msg)
            except (KeyError, TypeError, ValueError) as err:
                raw[party] = FedmergeError(f"malformed reply ({err})")
        accepted = self.server.accept(server_round, self.start_weights, raw)

        def judge(candidates: list[StateDict]) -> list[float]:
            assert self.grid is not None  # set by configure_train
            messages = self._evaluate_messages(dict(enumerate(candidates)), ("valid",), server_round, sample=True)
            replies = self.grid.send_and_receive(messages, timeout=60 * self.config.timeout_minutes)
            return self.server.valid_scores(server_round,
                                            self._evaluations(replies, list(range(len(candidates))), ("valid",)))

        outcome, self.models = self.server.merge(server_round, self.start_weights, accepted, judge)
        return ArrayRecord(outcome.merged), MetricRecord({"merge_seconds": outcome.seconds})

    def _evaluate_messages(self, models: dict, splits: tuple[str, ...], server_round: int,
                           sample: bool = False) -> list[Message]:
        """Every party is asked to evaluate `models` (in order) on `splits` (``sample``: see ``party_evaluate``)."""
        content = RecordDict({"config": ConfigRecord({"federation": self.federation, "models": len(models),
                                                       "splits": json.dumps(splits), "sample": sample})})
        for index, weights in enumerate(models.values()):
            content[f"model-{index}"] = ArrayRecord(weights)
        return self._messages(content, "evaluate", server_round)

    def _evaluations(self, replies: Iterable[Message], labels: list,
                     splits: tuple[str, ...]) -> dict[int, dict[Any, Metrics] | Exception]:
        """Each party's metrics of the models sent in order, keyed by `labels`, on `splits`; or its error."""
        evaluations: dict[int, dict[Any, Metrics] | Exception] = {}
        for msg in replies:
            party = self.party_of[msg.metadata.src_node_id]
            if msg.has_error():
                evaluations[party] = _error(msg)
                continue
            evaluations[party] = {label: {split: {k: float(v) for k, v in  # type: ignore[arg-type]
                                                  msg.content[f"metrics-{i}-{split}"].items()} for split in splits}
                                  for i, label in enumerate(labels)}
        return evaluations

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.server.evaluating(server_round, list(self.models))
        return self._evaluate_messages(self.models, self.config.splits, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        labels = list(self.models)
        result = self.server.record(server_round, labels, self._evaluations(replies, labels, self.config.splits))
        return MetricRecord({"rows": len(result.rows)})

    def summary(self) -> None:
        self.server.log("strategy", name=type(self).__name__, parties=len(self.nodes), rounds=self.config.rounds)


def discover(grid: Grid, config: FederationConfig) -> dict[int, dict[str, float | str] | Exception]:
    """Wait for every party's node, ask each who it is (``query``); keyed by party id, with ``node`` ids."""
    deadline = time.monotonic() + 60 * config.timeout_minutes
    nodes: list[int] = []
    while len(nodes) < config.n_parties and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    if len(nodes) < config.n_parties:
        raise FedmergeError(f"only {len(nodes)} of {config.n_parties} parties connected within "
                            f"{config.timeout_minutes} minutes; start more SuperNodes or lower the party count")
    content = RecordDict({"config": ConfigRecord({"federation": json.dumps(config.model_dump())})})
    messages = [Message(content=content, message_type="query", dst_node_id=node, group_id="query") for node in nodes]
    found: dict[int, dict[str, float | str] | Exception] = {}
    for msg in grid.send_and_receive(messages, timeout=60 * config.timeout_minutes):
        if msg.has_error():
            raise FedmergeError(f"node {msg.metadata.src_node_id} could not load its data: {msg.error.reason}")
        record = msg.content["party"]
        found[int(record["party"])] = {"domain": str(record["domain"]), "n_items": float(record["n_items"]),
                                       "text_dim": float(record["text_dim"]), "node": int(msg.metadata.src_node_id)}
    return found


class FlowerBackend:
    """The transport of a Flower run: the ServerApp's grid, driven by :class:`MergeRecStrategy`."""

    def __init__(self, grid: Grid, config: FederationConfig) -> None:
        self.grid, self.config = grid, config
        self.found: dict[int, dict[str, float | str] | Exception] = {}

    def describe(self, log: Log) -> dict[int, dict[str, float | str] | Exception]:
        """Each party's description; a grid built with :func:`reply_logger` logs each one as it arrives."""
        self.found = discover(self.grid, self.config)
        return self.found

    def run_rounds(self, base: StateDict, server: Server) -> list[RoundResult]:
        nodes = {party: int(info["node"]) for party, info in self.found.items()}  # type: ignore[index]
        strategy = MergeRecStrategy(self.config, server, nodes)
        strategy.start(self.grid, ArrayRecord(base), num_rounds=self.config.rounds,
                       timeout=60 * self.config.timeout_minutes)
        return server.results


Reporter = Callable[[Message, Message, float], None]
"""Called with (request, reply, seconds since the request was sent) for every reply as it arrives."""


class StoppableGrid:
    """A grid whose waits for replies end with an error once `stop` is set, and that reports each reply as it arrives.

    In simulation the ServerApp runs in a thread of its own, and Ctrl-C reaches the main thread
    only: without this, the ServerApp would wait out its timeout for parties that are gone.
    `on_reply` (see :func:`reply_logger`) hears of each party's reply when it comes, not when the
    last party's does; `poll` is the pause between two pulls of the replies.
    """

    def __init__(self, grid: Grid, stop: threading.Event, on_reply: Reporter | None = None, poll: float = 0.1) -> None:
        self.grid, self.stop, self.on_reply, self.poll = grid, stop, on_reply, poll

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def _check(self) -> None:
        if self.stop.is_set():
            raise FedmergeError("the run was interrupted")

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull replies until all arrived, `timeout` seconds passed, or the run stops."""
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
                    self.on_reply(requests[msg.metadata.reply_to_message_id], msg, time.monotonic() - sent)
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
            spec = specs[int(reply.content["party"]["party"])]  # type: ignore[arg-type]
            kind = request.metadata.message_type
            if kind == "query":
                log_ready(log, spec, {"n_items": float(reply.content["party"]["n_items"])})  # type: ignore[arg-type]
            elif kind == "train":
                log_trained(log, int(request.metadata.group_id), spec,
                            {k: float(v) for k, v in reply.content["metrics"].items()})  # type: ignore[arg-type]
            elif kind == "evaluate":
                asked = request.content["config"]
                log_evaluated(log, int(request.metadata.group_id), spec, int(asked["models"]), seconds,  # type: ignore[arg-type]
                              bool(asked["sample"]))
        except (KeyError, TypeError, ValueError):
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
    return load_config(preset, overrides, FederationConfig), Path(str(run_config.get("out", "runs/deployed")))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation on the deployed SuperNodes and write the run directory (``run.json`` says how it ended)."""
    config, out = deployed_run(context.run_config)

    def run(run_dir):  # type: ignore[no-untyped-def]
        watched = StoppableGrid(grid, threading.Event(), reply_logger(config, run_dir.log), poll=1.0)
        return execute(config, FlowerBackend(watched, config), run_dir)

    simulate(config, run, out, Console(markup=False))
