"""The console of ``fedmerge simulate``.

Our lines only (Flower's and Ray's behind --verbose), numbers rounded, the results table and the run
directory at the end; the event log keeps every value unrounded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import time
import warnings
from pathlib import Path

import psutil
import pytest
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

from fedmerge import progress
from fedmerge.runs.rundir import RunScreen
from tests.test_flower import _session, simulate_command
from tests.test_pipeline import TINY

QUICK = [*TINY, "evaluate_valid=false"]
LONG_FLOAT = re.compile(r"\d\.\d{7,}")  # a float printed as it is computed, not rounded


def _simulate(out: Path, *flags: str) -> tuple[int, str]:
    """``fedmerge simulate --backend flower`` on the tiny synthetic federation, off a terminal.

    Returns the exit code and stdout + stderr.
    """
    child = subprocess.Popen(
        [*simulate_command("flower", out, QUICK), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        text, _ = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        for _ in range(20):  # Ray's daemons may take a moment to exit after the run
            left = [p for p in psutil.process_iter() if _session(p) == child.pid]
            if not left:
                break
            time.sleep(0.5)
        for process in left:
            process.kill()
    assert not left, [p.pid for p in left]
    return child.returncode, text


def test_simulate_prints_our_rounded_lines_then_the_results_table_and_the_run_directory(
    tmp_path: Path, cache: Path
) -> None:
    out = tmp_path / "run [bold]x"  # a path that would be markup if printed as markup
    code, text = _simulate(out)
    assert code == 0, text
    for noise in ("INFO :", "WARNING :", "DEPRECATED", "FutureWarning", "ClientAppActor", "\x1b["):
        assert noise not in text, noise  # Flower's and Ray's lines, warnings, colour codes
    assert not LONG_FLOAT.findall(text)
    lines = text.splitlines()
    for phase in (
        "start-up: Flower's simulation runtime (Ray), 2 nodes",
        "synth-0 ready: 200 items",
        "synth-1 trained: 4 epochs (best ",
        "learning merge coefficients 40/40 loss ",
        "round 1: merged in ",
        "synth-0 evaluated 5 models",
        "round 1 done: train ",
    ):
        assert any(phase in line for line in lines), phase
    trained = next(line for line in lines if "synth-0 trained" in line)
    assert re.search(r"last loss \d+\.\d{4}, best valid ndcg@10 0\.\d{4}, \d+\.\d s$", trained), (
        trained
    )

    rows = {(r["model"], r["domain"]): r for r in json.loads((out / "metrics.json").read_text())}
    table = lines.index(
        "| model | synth-0 recall@10 | synth-0 ndcg@10 | synth-1 recall@10 | synth-1 ndcg@10 |"
    )
    merged = rows[("merged (layer-wise, mergerec)", "synth-1")]
    assert "| merged (layer-wise, mergerec) | " in lines[table + 6]
    assert lines[table + 6].endswith(f"| {merged['recall@10']:.4f} | {merged['ndcg@10']:.4f} |")
    # the last line, the path as given
    assert lines[-1].startswith(f"run directory: {out} (report.md, ")

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    party = next(e for e in events if e["event"] == "party_trained")
    # the log: unrounded
    assert LONG_FLOAT.search(repr(party["best_valid_ndcg@10"])) and party["epochs"] == 4.0


def test_verbose_shows_flowers_own_log_lines(tmp_path: Path, cache: Path) -> None:
    code, text = _simulate(tmp_path / "run", "--verbose")
    assert code == 0, text
    assert "INFO :" in text and "DEPRECATED FEATURE" in text and "[ROUND 1/1]" in text
    assert "\x1b[92mINFO" not in text  # off a terminal Flower's own lines come without colour codes
    assert "round 1 done: train " in text and "run directory: " in text  # ours as well


def test_the_screen_rounds_numbers_and_prints_values_as_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    console = Console(file=io.StringIO(), markup=False, width=60)  # not a terminal: plain lines
    screen = RunScreen(console, time.time())
    try:
        screen.show({"t": 1.234, "event": "merge_start", "round": 1, "domains": ["[red]a", "b"]})
        screen.show(
            {
                "t": 2.0,
                "event": "merge_done",
                "round": 1,
                "seconds": 2.123456789,
                "weights": [[0.123456789, 1.0], [0.987654321, 2.5]],
                "selection": {
                    "steps": [0, 40],
                    "scales": [1.0, 0.5],
                    "scores": [0.31234567, 0.3298765432],
                    "chosen_step": 40,
                    "chosen_scale": 0.5,
                },
            }
        )
        screen.show(
            {"t": 3.0, "event": "something_new", "loss": 1.23456789, "per": {"x": [0.1111111111]}}
        )
        with progress.progress_bar(
            TextColumn("[bold]learning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
        ) as bar:
            task = bar.add_task("learn", total=8, loss=0.0)
            for step in range(8):
                bar.update(task, advance=1, loss=1 / (step + 3))
    finally:
        screen.close()
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "    1.2 s  round 1: the server merges [red]a, b\n" in text
    assert (
        "round 1: merged in 2.1 s, kept step 40 x 0.5 (mean valid ndcg@10 0.3299, the best of 2 "
        "candidates); coefficients [red]a [0.1235, 1.0000], b [0.9877, 2.5000]"
    ) in text
    assert "something new: loss 1.2346, per {x: [0.1111]}" in text
    assert [
        re.sub(r"^ +\d+\.\d s  ", "", line) for line in text.splitlines() if "learning" in line
    ] == [
        "  learning 2/8 loss 0.2500",
        "  learning 4/8 loss 0.1667",
        "  learning 6/8 loss 0.1250",
        "  learning 8/8 loss 0.1000",
    ]  # a line at each quarter, off a terminal
    assert not LONG_FLOAT.findall(text) and "\x1b[" not in text
    # after the run: plain lines on stderr
    bar = progress.progress_bar(TextColumn("after"), MofNCompleteColumn())
    task = bar.add_task("after", total=1)
    bar.advance(task)
    assert "after 1/1" in capsys.readouterr().err and "after" not in console.file.getvalue()  # type: ignore[attr-defined]
    assert progress.progress_bar(TextColumn("x"), quiet=True).disable


def test_runtime_output_hides_flower_and_ray_and_keeps_flowers_errors(
    recwarn: pytest.WarningsRecorder,
) -> None:
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    from server.simulation import runtime_output

    level = console_handler.level
    with runtime_output(verbose=False) as (init_args, errors):
        assert init_args == {"logging_level": "ERROR", "log_to_driver": False}
        assert console_handler.level > logging.CRITICAL
        FLOWER_LOGGER.error("An exception occurred !! %s", "ActorPool is empty")
        warnings.warn_explicit("a tip", FutureWarning, "worker.py", 1, module="ray._private.worker")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="fedmerge.x")
    assert errors == ["An exception occurred !! ActorPool is empty"]
    assert [str(w.message) for w in recwarn] == ["ours"]  # Ray's warning ignored, ours kept
    assert console_handler.level == level and not any(
        type(h).__name__ == "_Keep" for h in FLOWER_LOGGER.handlers
    )
    with runtime_output(verbose=True) as (init_args, _):
        assert (
            init_args == {}
            and console_handler.level == level
            and os.environ.get("RAY_COLOR_PREFIX") == "0"
        )
