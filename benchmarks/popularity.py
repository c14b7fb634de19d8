"""Popularity baseline on every registered domain (test split), as Markdown and CSV.

Protocol: leave-one-out (test = last item; MergeRec domains use their published split),
full ranking over all items of the domain, seen items not excluded, ties broken by item
index; the score of an item is its count in the training split.

    python benchmarks/popularity.py [--domains beauty,sports,...]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from fedmerge.data import REGISTRY, load_domain
from fedmerge.evaluate import evaluate_domain
from fedmerge.evaluate.popularity import popularity_scorer
from fedmerge.runs.results import metric_row, write_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default=",".join(REGISTRY))
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "popularity"
    )
    args = parser.parse_args()
    rows, lines = (
        [],
        [
            "| domain | users | items | recall@10 | ndcg@10 | recall@50 | seconds |",
            "|---|---|---|---|---|---|---|",
        ],
    )
    for name in args.domains.split(","):
        domain = load_domain(name, quiet=True)
        start = time.perf_counter()
        metrics = evaluate_domain(popularity_scorer, domain, "test")
        seconds = time.perf_counter() - start
        rows.append(metric_row("popularity", name, "test", metrics))
        lines.append(
            f"| {name} | {domain.n_users:,} | {domain.n_items:,} | {metrics['recall@10']:.4f} | "
            f"{metrics['ndcg@10']:.4f} | {metrics['recall@50']:.4f} | {seconds:.2f} |"
        )
    write_metrics(rows, args.out)
    protocol = (__doc__ or "").split("\n\n")[1]
    text = (
        f"# Popularity baseline\n\n{protocol}\n\nMachine: {platform.machine()}, "
        f"{platform.python_version()}.\n\n" + "\n".join(lines) + "\n"
    )
    (args.out / "popularity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
