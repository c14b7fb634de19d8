"""Full-ranking evaluation speed against a bare ``torch.topk(users @ items.T)``.

Protocol: the size of ``sports`` (35,598 users x 18,357 items), 64-d random float32 vectors,
random targets; both sides use the same tensors, the same user batch size and the same
thread count. fedmerge's side computes each target's rank (ties by item index) and every
metric (recall/ndcg/mrr at 1, 5, 10, 20, 50); the bare side only scores and takes the top 50.
Each side is timed ``--repeats`` times; the best time counts. Prints a Markdown table and
writes it with a CSV under ``benchmarks/results/``.

    python benchmarks/eval_speed.py [--users 35598 --items 18357 --dim 64 --batch-size 1024]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from report import write_row

from fedmerge.evaluate import rank_embeddings, summarize


def _cpu() -> str:
    """The CPU model name (Linux), or the machine type."""
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.machine()


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=35598)
    parser.add_argument("--items", type=int, default=18357)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    users = torch.randn(args.users, args.dim, generator=generator)
    items = torch.randn(args.items, args.dim, generator=generator)
    targets = torch.randint(args.items, (args.users,), generator=generator)

    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, args.users, args.batch_size):
                torch.topk(users[start : start + args.batch_size] @ items.T, 50)

    def fedmerge_eval() -> None:
        summarize(rank_embeddings(users, items, targets, batch_size=args.batch_size))

    bare(), fedmerge_eval()  # warm-up
    t_bare, t_ours = _best_time(bare, args.repeats), _best_time(fedmerge_eval, args.repeats)
    row = {
        "machine": f"{_cpu()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "users": args.users,
        "items": args.items,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "bare_topk_s": round(t_bare, 3),
        "fedmerge_s": round(t_ours, 3),
        "bare_users_per_s": round(args.users / t_bare),
        "fedmerge_users_per_s": round(args.users / t_ours),
        "ratio": round(t_bare / t_ours, 3),
    }
    print(
        write_row(
            args.out,
            "eval_speed",
            "Full-ranking evaluation speed",
            (__doc__ or "").split("\n\n")[1],
            row,
        )
    )


if __name__ == "__main__":
    main()
