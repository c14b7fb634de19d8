"""Running an ablation: plan the grid, run (or reuse) every run, write the table and figure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedmerge.ablate.cache import CachedTraining, Say
from fedmerge.ablate.config import AblateConfig
from fedmerge.ablate.folder import CACHE, complete, prepare_out
from fedmerge.ablate.grid import Run, plan
from fedmerge.ablate.report import plot_table, table, write_table
from fedmerge.errors import FedmergeError
from fedmerge.pipeline import simulate
from fedmerge.runs.outdir import partial_dir


def run_ablation(config: AblateConfig, out: Path, say: Say = print) -> list[dict[str, Any]]:
    """Plan the grid, run (or reuse) every run into `out`, and write the table and the figure.

    Parameters
    ----------
    config : AblateConfig
        The grid.
    out : Path
        The ablation's folder: ``runs/``, ``training-cache/``, ``ablate.csv``, ``ablate.md``,
        ``ablate.png``.
    say : callable
        Shows a line of progress (one as each run starts and ends, and each reused training).

    Returns
    -------
    list of dict
        The table's rows (the columns of :data:`fedmerge.ablate.report.COLUMNS`).
    """
    grid = plan(config)
    prepare_out(out, config)
    for index, run in enumerate(grid.runs, 1):
        run_one(run, out, f"[{index}/{len(grid.runs)}]", say)
    rows = table(grid, out)
    write_table(rows, out)
    plot_table(rows, grid, out / "ablate.png")
    return rows


def run_one(run: Run, out: Path, tag: str, say: Say) -> None:
    """Run `run` into ``out/runs/NAME`` unless a complete run of its config is there."""
    folder = out / "runs" / run.name
    if complete(folder, run.config):
        say(f"{tag} {run.name}: complete, reused")
        return
    say(f"{tag} {run.name}: started")
    began = time.perf_counter()
    transport = CachedTraining(run.config, out / CACHE, lambda text: say(f"{tag}   {text}"))
    try:
        simulate(run.config, transport, folder)
    except FedmergeError as err:
        raise FedmergeError(
            f"run {run.name} failed ({err}); its log is {partial_dir(folder) / 'events.jsonl'}; "
            "fix the cause and give the same command again (complete runs and kept trainings are "
            "reused)"
        ) from err
    say(
        f"{tag} {run.name}: done in {time.perf_counter() - began:.1f} s ({transport.trained} "
        f"trained, {transport.reused} reused local trainings)"
    )
