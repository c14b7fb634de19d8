"""Benchmark bookkeeping: one-row results as Markdown (with their protocol) and CSV.

Training runs are reused when finished.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedmerge.train.config import ExperimentConfig
from fedmerge.train.run import same_config, train_run


def write_row(out: Path, name: str, title: str, protocol: str, row: dict[str, object]) -> str:
    """Write ``out/name.md`` and ``out/name.csv`` for one measured row.

    Return the Markdown table.
    """
    table = (
        "| "
        + " | ".join(row)
        + " |\n|"
        + "---|" * len(row)
        + "\n| "
        + " | ".join(map(str, row.values()))
        + " |\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(f"# {title}\n\n{protocol}\n\n{table}")
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return table


def finished_run(folder: Path, config: ExperimentConfig) -> bool:
    """Whether `folder` holds a finished training run of `config`.

    A finished run of another config is an error.
    """
    if not (folder / "metrics.json").exists():
        return False
    if not same_config(folder / "config.json", config):
        raise SystemExit(
            f"{folder} holds a run of another config; give another --runs folder or remove it"
        )
    return True


def train_once(
    names: list[str],
    config: ExperimentConfig,
    folder: Path,
    init: Path | None = None,
    label: str | None = None,
) -> None:
    """Train `names` into `folder` (quietly) unless it already holds a finished run of `config`."""
    if not finished_run(folder, config):
        train_run(names, config, folder, init=init, quiet=True, label=label)
