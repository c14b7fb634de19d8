"""A real multi-process Flower deployment on loopback.

SuperLink, a SuperNode per domain, SuperExecs, ``flwr run``.

The processes run exactly the commands of docker-compose.yml (only the addresses differ), with
a private HOME / FLWR_HOME / FEDMERGE_DATA each, as containers would have. The deployed run must
write the same metrics as the in-process reference; every process the test starts is stopped by
its process group, even when the test fails, and none is left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import yaml

from fedmerge.models.llm import tiny_base
from fedmerge.models.lm_base import fingerprint
from fedmerge.pipeline import InProcess, simulate
from fedmerge.text.tokens import minilm_folder
from server.app import deployed_run
from tests.test_llm import tiny_llm
from tests.test_pipeline import TINY

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flower-superlink, flwr, ... of this environment
CONNECTION = "fedmerge-test"
OVERRIDES = [
    'domains=["synth-0","synth-1"]',
    *TINY,
    "client_cpus=1",
    "train.epochs=1",
    "merge.learn.steps=5",
    "timeout_minutes=2",
]
FLWR_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def commands(bind: str, link: str, nodes: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    """Every long-lived process of the deployment (compose service name -> argv).

    Parameters
    ----------
    bind : str
        The host the SuperLink and SuperNodes listen on.
    link : str
        The SuperLink's ``host:port`` (Fleet, Control and Runtime API on one port).
    nodes : dict[str, tuple[str, str]]
        Per SuperNode (a letter): its domain and its Runtime API ``host:port``, where its SuperExec
        connects.
    """
    procs = {
        "superlink": [
            "flower-superlink",
            "--insecure",
            "--isolation",
            "process",
            "--host",
            bind,
            "--port",
            link.rsplit(":", 1)[1],
            "--disable-runtime-dependency-installation",
        ],
        "superexec-serverapp": ["flower-superexec", "--insecure", "--runtime-api-address", link],
    }
    for letter, (domain, runtime) in nodes.items():
        procs[f"supernode-{letter}"] = [
            "flower-supernode",
            "--insecure",
            "--superlink",
            link,
            "--isolation",
            "process",
            "--host",
            bind,
            "--port",
            runtime.rsplit(":", 1)[1],
            "--node-config",
            f'domain="{domain}"',
        ]
        procs[f"superexec-clientapp-{letter}"] = [
            "flower-superexec",
            "--insecure",
            "--runtime-api-address",
            runtime,
        ]
    return procs


def compose_commands() -> dict[str, list[str]]:
    """The argv of every service of docker-compose.yml, with ``${VAR:-default}`` at its default."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {
        name: [
            re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(arg))
            for arg in [*spec["entrypoint"], *spec["command"]]
        ]
        for name, spec in services.items()
    }


def test_compose_runs_the_commands_the_deployment_test_runs() -> None:
    expected = commands(
        "0.0.0.0",
        "superlink:8000",
        {"a": ("books", "supernode-a:9094"), "b": ("movies", "supernode-b:9094")},
    )
    assert compose_commands() == expected
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {s["image"].split(":")[0] for s in services.values()} == {
        "flwr/superlink",
        "flwr/supernode",
        "fedmerge-superexec",
    }


class Processes:
    """The processes a test starts, each in its own process group, with logs.

    Each group is killed whole by its leader's PID.
    """

    def __init__(self, root: Path) -> None:
        self.root, self.logs = root, root / "logs"
        self.logs.mkdir(parents=True)
        self.started: list[subprocess.Popen[bytes]] = []

    def env(self, name: str) -> dict[str, str]:
        """A process's environment: its own HOME, FLWR_HOME and dataset cache, Flower offline."""
        private = {
            key: self.root / key.lower() / name for key in ("HOME", "FLWR_HOME", "FEDMERGE_DATA")
        }
        for folder in private.values():
            folder.mkdir(parents=True, exist_ok=True)
        return (
            os.environ
            | FLWR_ENV
            | {k: str(v) for k, v in private.items()}
            | {
                # SuperExecs launch flwr-serverapp / flwr-clientapp
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
            }
        )

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start `argv` in a new session, output to ``logs/NAME.log``.

        Its program comes from this environment.
        """
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [str(BIN / argv[0]), *argv[1:]],
                cwd=self.root,
                env=self.env(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def flwr_start(self, *args: str) -> subprocess.Popen[bytes]:
        """Start the ``flwr`` CLI from the repository root, its stdout piped.

        See :meth:`output`.
        """
        with open(self.logs / "flwr.log", "ab") as log:
            proc = subprocess.Popen(
                [str(BIN / "flwr"), *args],
                cwd=ROOT,
                env=self.env("flwr"),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes], timeout: float) -> str:
        """The stdout of `proc` once it ended.

        Fails the test when it takes longer than `timeout` seconds.
        """
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(
                f"{' '.join(map(str, proc.args))} did not finish within {timeout:.0f} s:\n"  # type: ignore[arg-type]
                f"{out.decode()}{self.tails()}"
            )
        return out.decode()

    def flwr(self, *args: str, timeout: float) -> str:
        """Run the ``flwr`` CLI and return its stdout."""
        return self.output(self.flwr_start(*args), timeout)

    def tails(self, lines: int = 25) -> str:
        """The last `lines` of every log, to explain a failure."""
        return "".join(
            f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        """SIGTERM every process group, wait, then SIGKILL whatever is left of them.

        Reap the leaders.
        """
        for proc in reversed(self.started):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.started:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.started:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def leftover(self) -> list[str]:
        """``ps`` lines of any process still in one of the started process groups."""
        groups = {proc.pid for proc in self.started}
        deadline = time.monotonic() + 10
        while True:
            ps = subprocess.run(
                ["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True
            )
            alive = [
                line
                for line in ps.stdout.splitlines()
                if int(line.split()[1]) in groups and not line.split()[2].startswith("Z")
            ]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on loopback."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], processes: Processes, timeout: float = 60
) -> None:
    """Return once ``127.0.0.1:port`` accepts connections.

    Fail if `proc` exits or the time is up.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with code {proc.returncode}:{processes.tails()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:{processes.tails()}")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Processes]:
    """SuperLink, two SuperNodes (synth-0, synth-1) and three SuperExecs on loopback.

    Yields a ``flwr`` connection to them.
    """
    link_port, *node_ports = free_ports(3)
    link = f"127.0.0.1:{link_port}"
    nodes = {
        "a": ("synth-0", f"127.0.0.1:{node_ports[0]}"),
        "b": ("synth-1", f"127.0.0.1:{node_ports[1]}"),
    }
    processes = Processes(tmp_path / "deployment")
    try:
        for name, argv in commands("127.0.0.1", link, nodes).items():
            proc = processes.start(name, argv)
            if name == "superlink":
                wait_for_port(link_port, proc, processes)
        (Path(processes.env("flwr")["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = '
            f'"{link}"\ninsecure = true\n'
        )
        yield processes
    finally:
        processes.stop()
    leftover = processes.leftover()
    assert not leftover, f"processes left running: {leftover}"


def run_both(
    deployment: Processes, run_config: dict[str, str], reference: Path
) -> tuple[list[dict], list[dict]]:
    """The deployed run's metrics and the in-process reference's (run while the first waits)."""
    config, out = deployed_run(run_config)
    overrides = " ".join(f"{key}='{value}'" for key, value in run_config.items())
    submit = deployment.flwr_start(
        "run", str(ROOT), CONNECTION, "--run-config", overrides, "--stream"
    )
    simulate(config, InProcess(config), reference)
    output = deployment.output(submit, timeout=300)
    started = re.search(r"Successfully started run (\d+)", output)
    assert started, output + deployment.tails()
    listed = json.loads(
        deployment.flwr("ls", CONNECTION, "--run-id", started[1], "--format", "json", timeout=60)
    )
    # --stream exits 0 anyway
    assert listed["runs"][0]["status"] == "finished:completed", output + deployment.tails()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    deployed, inprocess = (
        json.loads((path / "metrics.json").read_text()) for path in (out, reference)
    )
    return deployed, inprocess


def test_deployed_run_matches_inprocess(deployment: Processes, tmp_path: Path, cache: Path) -> None:
    run_config = {"config": "", "set": ";".join(OVERRIDES), "out": str(tmp_path / "deployed")}
    deployed, inprocess = run_both(deployment, run_config, tmp_path / "inprocess")
    assert deployed == inprocess
    assert {r["model"] for r in deployed} >= {
        "theta_0",
        "fine-tuned on synth-0",
        "fine-tuned on synth-1",
    }


def test_deployed_language_model_parties_match_inprocess(
    deployment: Processes, tmp_path: Path, cache: Path
) -> None:
    base = tiny_base(tmp_path / "tiny-llm", minilm_folder())
    overrides = [
        'domains=["synth-0","synth-1"]',
        "client_cpus=1",
        *tiny_llm(base),
        f"model.base_hash={fingerprint(base)}",  # every party checks its copy of the base
        "train.evaluation.users=8",
        "train.valid_users=8",
        "train.batches_per_epoch=4",
        "merge.learn.steps=3",
        "merge.learn.pseudo.count=8",
        "timeout_minutes=3",
    ]
    run_config = {
        "config": "simulate-llm",
        "set": ";".join(overrides),
        "out": str(tmp_path / "deployed"),
    }
    deployed, inprocess = run_both(deployment, run_config, tmp_path / "inprocess")
    assert deployed == inprocess
    assert {r["protocol"] for r in deployed} == {"19 uniform negatives, seed 0, 8 users sampled"}
    assert {r["model"] for r in deployed} >= {"theta_0", "fine-tuned on synth-0"}


def test_deployed_woven_run_matches_inprocess(
    deployment: Processes, tmp_path: Path, cache: Path
) -> None:
    base = tiny_base(tmp_path / "tiny-llm", minilm_folder())
    overrides = [
        "target=synth-0",
        'sources=["synth-1"]',
        "client_cpus=1",
        *tiny_llm(base),
        "train.evaluation.users=6",
        "train.valid_users=6",
        "train.batches_per_epoch=2",
        "weave.steps=2",
        "timeout_minutes=3",
    ]
    run_config = {"config": "weaverec", "set": ";".join(overrides), "out": str(tmp_path / "out")}
    deployed, inprocess = run_both(deployment, run_config, tmp_path / "inprocess")
    assert deployed == inprocess
    assert {r["domain"] for r in deployed} == {"synth-0"}
    assert "woven merge (average)" in {r["model"] for r in deployed}
