"""Secure aggregation's cost: ``secagg`` against plain FedAvg of the same parties (Flower backend).

Protocol: ``fedmerge simulate`` on Flower + Ray (the only backend that runs SecAgg+), ``--domains``
with ``parties_per_domain`` parties each (each domain's users split between them), the same config
and seed twice: ``privacy.mechanism = none`` (the server averages each domain's party updates,
weighted by users: FedAvg) and ``secagg`` (the server receives each domain's sum only). Every
message the server sends or receives is serialised as Flower sends it (protobuf) and its bytes
counted; the wall time of each run; the quality of every model compared (the largest difference
of any metric between the two runs: only SecAgg+'s quantisation should remain).

    python benchmarks/secagg_cost.py [--domains pantry,toys] [--parties 4] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.common.serde import message_to_proto
from report import write_row

import server.app
import server.simulation
from fedmerge.config import load_config
from fedmerge.pipeline import simulate
from fedmerge.protocol import FederationConfig


class CountingGrid:
    """A grid that counts the serialised bytes of every message, by message type."""

    def __init__(self, grid: Any) -> None:
        self.grid, self.bytes, self.count = grid, Counter[str](), Counter[str]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for message in messages + replies:
            kind = message.metadata.message_type.split(".")[0]
            side = "reply" if message.metadata.reply_to_message_id else "sent"
            self.bytes[f"{kind} {side}"] += message_to_proto(message).ByteSize()
            self.count[f"{kind} {side}"] += 1
        return replies


def measure(config: FederationConfig, out: Path) -> tuple[float, CountingGrid, list[dict]]:
    """One Flower run of `config`: seconds, its counting grid, its metric rows."""
    grids: list[CountingGrid] = []
    original = server.app.FlowerBackend.__init__

    def counting_init(self: Any, grid: Any, config: Any, context: Any = None) -> None:
        grids.append(CountingGrid(grid))
        original(self, grids[-1], config, context)

    server.app.FlowerBackend.__init__ = counting_init  # type: ignore[method-assign]
    try:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        simulate(config, server.simulation.flower_backend(config), out)
        seconds = time.perf_counter() - start
    finally:
        server.app.FlowerBackend.__init__ = original  # type: ignore[method-assign]
    return seconds, grids[0], json.loads((out / "metrics.json").read_text())


def _train_bytes(grid: CountingGrid) -> int:
    """Bytes of the train messages and replies (SecAgg+ sends its stages as train messages)."""
    return sum(v for k, v in grid.bytes.items() if k.startswith("train"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="pantry,toys")
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=Path, default=Path("runs/secagg-cost"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    common = [
        f"domains={json.dumps(args.domains.split(','))}",
        f"parties_per_domain={args.parties}",
        *args.overrides,
    ]
    runs = {}
    for mechanism in ("none", "secagg"):
        config = load_config(
            "simulate", [*common, f"privacy.mechanism={mechanism}"], FederationConfig
        )
        runs[mechanism] = measure(config, args.runs / mechanism)
        print(f"{mechanism}: {runs[mechanism][0]:.0f} s")
    (plain_s, plain, plain_rows), (secure_s, secure, secure_rows) = runs["none"], runs["secagg"]
    keys = ("recall@10", "ndcg@10")
    paired = {(r["model"], r["domain"], r["split"]): r for r in plain_rows}
    gap = max(
        abs(r[k] - paired[(r["model"], r["domain"], r["split"])][k])
        for r in secure_rows
        for k in keys
    )
    row = {
        "domains": args.domains,
        "parties per domain": args.parties,
        "FedAvg seconds": round(plain_s, 1),
        "secagg seconds": round(secure_s, 1),
        "FedAvg train MB": round(_train_bytes(plain) / 1e6, 2),
        "secagg train MB (every SecAgg+ stage)": round(_train_bytes(secure) / 1e6, 2),
        "FedAvg all MB": round(sum(plain.bytes.values()) / 1e6, 2),
        "secagg all MB": round(sum(secure.bytes.values()) / 1e6, 2),
        "largest metric difference": float(f"{gap:.3g}"),
        "message types (secagg)": "; ".join(
            f"{k}: {secure.count[k]} messages, {v / 1e6:.2f} MB"
            for k, v in sorted(secure.bytes.items())
        ),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "settings": " ".join(args.overrides) or "preset",
    }
    print(write_row(args.out, "secagg_cost", "secagg cost", (__doc__ or "").split("\n\n")[1], row))


if __name__ == "__main__":
    main()
