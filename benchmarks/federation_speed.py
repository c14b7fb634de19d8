"""Federation overhead and memory: Flower + Ray simulation against the in-process pipeline.

Protocol: the same federation config and seed run once per backend (``fedmerge simulate``
in a fresh process each). Wall time is split into start-up (until every party has answered
the ``query``: Ray, SuperNodes, data loading) and the rounds (training, merge, evaluation);
the overhead ratio compares the rounds. Peak memory is the largest resident set of the whole
process tree (server, Ray workers), sampled every 0.2 s. Both backends give each party
``client_cpus`` threads; the metrics of the two runs are compared for equality.

    python benchmarks/federation_speed.py [--domains synth-0,synth-1] [--set key=value ...]
        [--flower-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from report import write_row

PROTOCOL = (__doc__ or "").split("\n\n")[1]


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(backend: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One ``fedmerge simulate`` in a child process.

    Seconds to the parties, seconds in all, peak tree RSS.
    """
    command = [
        sys.executable,
        "-m",
        "fedmerge",
        "simulate",
        "--domains",
        args.domains,
        "--backend",
        backend,
        "--out",
        str(out),
        *[x for item in args.overrides for x in ("--set", item)],
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, watched = 0, psutil.Process(child.pid)

    def watch() -> None:
        nonlocal peak
        while child.poll() is None:
            peak = max(peak, _tree_rss(watched))
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    code = child.wait()
    thread.join()
    total = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{backend} run failed (exit {code}); see {out}.partial/run.json")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    ready = next(e["t"] for e in events if e["event"] == "parties")
    done = next(e["t"] for e in reversed(events) if e["event"] == "round_done")
    return {
        "total_s": round(total, 1),
        "startup_s": round(ready, 1),
        "rounds_s": round(done - ready, 1),
        "peak_rss_gb": round(peak / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="synth-0,synth-1")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--flower-only", action="store_true", help="measure the Flower run only (e.g. many parties)"
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/federation_speed"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    flower = run("flower", args, args.runs / "flower")
    row = {
        "domains": args.domains,
        "settings": " ".join(args.overrides) or "preset",
        **{f"flower {k}": v for k, v in flower.items()},
    }
    if args.flower_only:
        print(
            write_row(
                args.out,
                "federation_memory",
                "Flower simulation: time and peak memory",
                PROTOCOL,
                row,
            )
        )
        return
    inprocess = run("inprocess", args, args.runs / "inprocess")
    same = json.loads((args.runs / "flower" / "metrics.json").read_text()) == json.loads(
        (args.runs / "inprocess" / "metrics.json").read_text()
    )
    row |= {
        **{f"inprocess {k}": v for k, v in inprocess.items()},
        "rounds ratio": round(flower["rounds_s"] / inprocess["rounds_s"], 3),
        "same metrics": same,
    }
    print(write_row(args.out, "federation_speed", "Federation overhead", PROTOCOL, row))


if __name__ == "__main__":
    main()
