"""Secure aggregation of one domain's parties by Flower's SecAgg+ (``privacy.mechanism = secagg``).

Each round, for each domain, the server runs SecAgg+'s four stages on that domain's nodes only
and receives the sum of their masked vectors. A party's vector is its update multiplied by its
number of users, followed by that number, so the server learns the domain's user-weighted
mean update and its total users, and neither one party's update nor its user count. SecAgg+
runs on Flower's legacy path: a client manager holding the domain's nodes, a legacy strategy
whose ``aggregate_fit`` keeps the one aggregate every survivor carries, and the legacy FitIns /
FitRes layout inside the ``train`` messages (legacy Parameters carry no names: the floating
tensors of the start, in key order).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from fedmerge.errors import FedmergeError
from fedmerge.merge.vectors import StateDict
from fedmerge.protocol import TrainReply

CLIP = 2.0**16
"""SecAgg+'s clipping range: a weighted entry (update x users) beyond it is refused by the party."""


def quantization(parties: int) -> int:
    """The quantization range: as fine as SecAgg+'s 32-bit field allows for `parties` summands."""
    return min(2**30, 2**32 // (parties + 1))


def floating(start: StateDict) -> list[str]:
    """The names of the tensors an update holds, in the order the vectors list them."""
    return [k for k, v in start.items() if v.is_floating_point()]


def when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+'s client mod for the ``train`` messages of a SecAgg+ round; the others pass."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secagg(msg: Message) -> bool:
    """Whether a ``train`` request is SecAgg+'s (the legacy FitIns layout)."""
    return "fitins.config" in msg.content.config_records


def read_fitins(msg: Message) -> tuple[StateDict, dict[str, Any]]:
    """The start weights and the config of a SecAgg+ ``train`` request."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config["names"]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    return {k: torch.from_numpy(np.array(a)) for k, a in zip(names, arrays, strict=True)}, dict(
        fitins.config
    )


def fitres_content(reply: TrainReply, start: StateDict) -> RecordDict:
    """A party's SecAgg+ vector: its update x its users, then its users; its metrics in clear."""
    users = reply.metrics["users"]
    # flat: SecAgg+ mangles 0-d arrays; the server restores each shape from the start
    vectors = [reply.update[k].double().reshape(-1).numpy() * users for k in floating(start)]
    largest = max(float(np.abs(v).max()) if v.size else 0.0 for v in vectors)
    if largest > CLIP:
        raise FedmergeError(
            f"an entry of the update x users is {largest:.3g}, beyond secure aggregation's "
            f"range of {CLIP:g}; the update diverged (lower train.lr)"
        )
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([*vectors, np.array([users])]),
        num_examples=1,
        metrics={k: v for k, v in reply.metrics.items() if k != "users"},
    )
    return compat.fitres_to_recorddict(fitres, False)


class _Keep(FedAvg):
    """A legacy strategy for one domain: every node takes part; the aggregate is kept as is."""

    def __init__(self, parties: int) -> None:
        super().__init__(
            fraction_fit=1.0,
            min_fit_clients=parties,
            min_available_clients=parties,
            fraction_evaluate=0.0,
            accept_failures=False,
        )
        self.aggregate: list[np.ndarray] | None = None
        self.metrics: dict[int, dict[str, float]] = {}

    def aggregate_fit(self, server_round, results, failures):
        """Keep the sum (each survivor carries the same aggregate) and each node's metrics."""
        if failures or not results:
            return None, {}
        # SecAgg+ hands every survivor the mean of the summed vectors over the survivors
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        self.metrics = {
            proxy.node_id: {k: float(v) for k, v in res.metrics.items()} for proxy, res in results
        }
        return results[0][1].parameters, {}


def secure_mean(
    grid: Grid,
    context: Context,
    nodes: list[int],
    start: StateDict,
    config: ConfigRecord,
    round_: int,
    timeout: float,
) -> tuple[StateDict, float, dict[int, dict[str, float]]]:
    """SecAgg+ over `nodes`: their user-weighted mean update, total users and plain metrics.

    Raises a FedmergeError naming the round when SecAgg+ halts (a node failed or dropped out).
    """
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=context.run_id))
    strategy = _Keep(len(nodes))
    names = floating(start)
    fit_config: dict[str, bool | bytes | float | int | str] = {
        "federation": str(config["federation"]),
        "names": json.dumps(list(start)),
    }
    strategy.on_fit_config_fn = lambda _: fit_config
    legacy = LegacyContext(context, ServerConfig(num_rounds=1), strategy, manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": round_})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([v.numpy() for v in start.values()]), keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=1.0,
        max_weight=1.0,
        clipping_range=CLIP,
        quantization_range=quantization(len(nodes)),
        timeout=timeout,
    )
    try:
        workflow(grid, legacy)
    finally:
        del legacy.state.array_records[MAIN_PARAMS_RECORD]
        del legacy.state.config_records[MAIN_CONFIGS_RECORD]
    if strategy.aggregate is None:
        raise FedmergeError(
            f"secure aggregation of round {round_} halted (a party failed or dropped out); "
            "see the parties' logs"
        )
    # the aggregate is the mean over the n survivors of (update x users, users)
    *vectors, users = strategy.aggregate
    total = float(users[0]) * len(nodes)
    mean = {
        k: torch.as_tensor(np.asarray(v, dtype=np.float64) * len(nodes) / total)
        .reshape(start[k].shape)
        .to(start[k].dtype)
        for k, v in zip(names, vectors, strict=True)
    }
    return mean, total, strategy.metrics
