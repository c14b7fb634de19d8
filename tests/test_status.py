"""``fedmerge status``: a run's record says whether it ended, runs, or died with its process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedmerge.cli import app
from fedmerge.errors import FedmergeError
from fedmerge.runs.outdir import HEARTBEAT_SECONDS
from tests.test_flower import ENDLESS, simulate_command
from tests.test_pipeline import TINY

QUICK = ["train.epochs=1", "merge.learn.steps=2", "evaluate_valid=false"]
"""On top of TINY: a run that only has to finish."""


def _status(out: Path, *options: str) -> str:
    result = CliRunner().invoke(app, ["status", str(out), *options])
    assert result.exit_code == 0, result.output
    return result.output


def _write_record(out: Path, **facts: Any) -> None:
    """A ``simulate`` run record in ``OUT.partial`` that says ``running``, with `facts`."""
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True)
    record = {
        "command": "simulate",
        "status": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": "2026-01-01T00:00:00",
        "heartbeat": time.time(),
    } | facts
    (partial / "run.json").write_text(json.dumps(record))


def test_a_run_whose_process_lives_and_beats_is_running(tmp_path: Path) -> None:
    out = tmp_path / "r[un]"  # rich markup must not eat the brackets
    _write_record(out)
    assert (
        f"r[un].partial: simulate running (PID {os.getpid()} on {socket.gethostname()}, heartbeat "
        "0 s ago)" in _status(out)
    )
    assert json.loads(_status(out, "--json"))["out"] is None
    assert json.loads(_status(out, "--json"))["partial"]["liveness"] == "live"


def test_a_run_whose_process_is_gone_or_whose_heartbeat_stopped_is_dead(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _write_record(tmp_path / "gone", pid=int(gone.stdout))
    # this process: alive
    _write_record(tmp_path / "stale", heartbeat=time.time() - 3 * HEARTBEAT_SECONDS - 1)
    for name in ("gone", "stale"):
        text = _status(tmp_path / name)
        assert (
            "simulate dead: the process that wrote it is gone" in text
            and "rerun the command to replace it" in text
        )
        assert json.loads(_status(tmp_path / name, "--json"))["partial"]["liveness"] == "dead"
    with pytest.raises(FedmergeError, match="holds no fedmerge run"):
        CliRunner().invoke(app, ["status", str(tmp_path / "nothing")], catch_exceptions=False)


def test_a_killed_simulate_shows_as_dead_and_the_next_simulate_replaces_it(
    tmp_path: Path, cache: Path
) -> None:
    out = tmp_path / "run"
    events = tmp_path / "run.partial" / "events.jsonl"
    child = subprocess.Popen(
        simulate_command("inprocess", out, ENDLESS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (events.exists() and "train_start" in events.read_text()):
            assert child.poll() is None and time.monotonic() < deadline, (
                "the run did not start training"
            )
            time.sleep(0.2)
    finally:
        # nothing it could catch: its record still says running
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert "run.partial: simulate dead: the process that wrote it is gone" in _status(out)

    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--domains",
            "synth-0,synth-1",
            "--backend",
            "inprocess",
            "--out",
            str(out),
            *[x for item in [*TINY, *QUICK] for x in ("--set", item)],
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(_status(out, "--json"))
    assert (records["out"]["status"], records["out"]["liveness"], records["partial"]) == (
        "complete",
        "ended",
        None,
    )
    assert f"{out}: simulate complete, started " in _status(out)
