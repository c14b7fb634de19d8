"""``fedmerge simulate --ray-address``: the parties on a running Ray cluster of two nodes.

A Ray head and a second Ray node run on loopback with one CPU each (``ray start --block``, each
in its own process group, stopped by PID at the end), each with its own dataset cache, so a
party that ran on a node left its data there. The run's metrics equal the in-process run's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmerge.cli import app
from fedmerge.config import load_config
from fedmerge.pipeline import InProcess, simulate
from fedmerge.protocol import FederationConfig
from tests.test_deployment import Processes, free_ports, wait_for_port
from tests.test_pipeline import TINY

SETTINGS = [*TINY, "client_cpus=1", "train.epochs=1", "merge.learn.steps=5"]


def alive_nodes(address: str) -> int:
    """How many nodes of the Ray cluster at `address` are alive."""
    probe = (
        "import ray; ray.init(address=%r, logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))" % address
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    return int(done.stdout.strip() or 0)


def test_simulate_runs_the_parties_on_a_ray_cluster(tmp_path: Path, cache: Path) -> None:
    port = free_ports(1)[0]  # an ephemeral port: outside Ray's worker ports (10002-19999)
    address = f"127.0.0.1:{port}"
    temp = Path(tempfile.mkdtemp(prefix="fmray", dir="/tmp"))  # Ray's socket paths must be short
    processes = Processes(tmp_path / "cluster")
    node = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    node += ["--disable-usage-stats"]
    try:
        head = processes.start(
            "head",
            ["ray", "start", "--head", "--port", str(port), "--include-dashboard", "false"]
            + ["--temp-dir", str(temp), *node],
        )
        wait_for_port(port, head, processes, timeout=120)
        processes.start("worker", ["ray", "start", "--address", address, *node])
        deadline = time.monotonic() + 120
        while alive_nodes(address) < 2:
            assert time.monotonic() < deadline, f"the second node did not join{processes.tails()}"
            time.sleep(1)
        out = tmp_path / "out"
        sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
        driver = processes.start(
            "driver",
            ["fedmerge", "simulate", "--domains", "synth-0,synth-1", *sets]
            + ["--out", str(out), "--ray-address", address],
        )
        assert driver.wait(timeout=600) == 0, processes.tails()
    finally:
        processes.stop()
        shutil.rmtree(temp, ignore_errors=True)
    assert not processes.leftover()
    config = load_config("simulate", [*SETTINGS, 'domains=["synth-0","synth-1"]'], FederationConfig)
    simulate(config, InProcess(config), tmp_path / "inprocess")
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        (tmp_path / "inprocess" / "metrics.json").read_text()
    )
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert {"event": "runtime_start", "backend": "flower", "nodes": 2, "ray": address}.items() <= (
        next(e for e in events if e["event"] == "runtime_start").items()
    )
    # a party that ran on a node left its data in that node's cache; the driver's holds none
    caches = {n: Path(processes.env(n)["FEDMERGE_DATA"]) for n in ("head", "worker", "driver")}
    assert [n for n, c in caches.items() if any(c.iterdir())] == ["head", "worker"]
    assert "on the cluster at " + address in (processes.logs / "driver.log").read_text()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:{port}"),
        ("head-without-port", "is not HOST:PORT"),
    ],
)
def test_a_ray_address_nothing_answers_at_is_refused_before_anything_is_written(
    tmp_path: Path, address: str, message: str
) -> None:
    port = free_ports(1)[0]  # nothing listens there: Ray alone would wait for it forever
    result = CliRunner().invoke(
        app,
        ["simulate", "--domains", "synth-0,synth-1", "--out", str(tmp_path / "out")]
        + ["--ray-address", address.format(port=port)],
    )
    assert result.exit_code != 0
    assert message.format(port=port) in str(result.exception)
    assert not list(tmp_path.iterdir())
