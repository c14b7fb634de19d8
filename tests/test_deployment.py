"""A real multi-process Flower deployment: secure, each party in its own network namespace.

SuperLink, a SuperNode per domain, SuperExecs, ``flwr run``.

The processes run exactly the commands of docker-compose.yml (TLS, SuperNode authentication,
SuperExec secrets; only the addresses and the certificate folder differ), or of
docker-compose.insecure.yml on loopback, with a private HOME / FLWR_HOME / FEDMERGE_DATA each,
as containers would have. A deployed run must write the same metrics as the in-process
reference; strangers are refused, a killed party is named, ``flwr stop`` is recorded. Every
process the test starts is stopped by its process group and every namespace removed, even when
the test fails, and none is left behind.
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
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedmerge.certs import issue
from fedmerge.models.llm import tiny_base
from fedmerge.models.lm_base import fingerprint
from fedmerge.pipeline import InProcess, simulate
from fedmerge.runs.outdir import partial_dir, read_record
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


@dataclass(frozen=True)
class Node:
    """One party's SuperNode: domain, Runtime API (for its SuperExec), SuperLink address."""

    domain: str
    runtime: str
    link: str


def commands(
    link: str, nodes: dict[str, Node], certs: str | None, link_bind: str, node_bind: str
) -> dict[str, list[str]]:
    """Every long-lived process of the deployment (compose service name -> argv).

    Parameters
    ----------
    link : str
        The SuperLink's ``host:port`` for its own SuperExec (Fleet, Control and Runtime API on
        one port).
    nodes : dict[str, Node]
        Per SuperNode (a letter): its domain, Runtime API and SuperLink address.
    certs : str | None
        The folder of ``fedmerge deploy certs`` (TLS, SuperNode authentication, SuperExec
        secrets), or None for the insecure deployment.
    link_bind, node_bind : str
        The hosts the SuperLink and the SuperNodes' Runtime APIs listen on.
    """
    secure = certs is not None
    procs = {
        "superlink": [
            "flower-superlink",
            *(
                [
                    "--ssl-ca-certfile",
                    f"{certs}/ca.crt",
                    "--ssl-certfile",
                    f"{certs}/superlink/server.crt",
                    "--ssl-keyfile",
                    f"{certs}/superlink/server.key",
                    "--enable-supernode-auth",
                    "--superexec-auth-secret-file",
                    f"{certs}/superlink/superexec.secret",
                ]
                if secure
                else ["--insecure"]
            ),
            "--isolation",
            "process",
            "--host",
            link_bind,
            "--port",
            link.rsplit(":", 1)[1],
            "--disable-runtime-dependency-installation",
        ],
        "superexec-serverapp": [
            "flower-superexec",
            *(
                [
                    "--root-certificates",
                    f"{certs}/ca.crt",
                    "--superexec-auth-secret-file",
                    f"{certs}/superlink/superexec.secret",
                ]
                if secure
                else ["--insecure"]
            ),
            "--runtime-api-address",
            link,
        ],
    }
    for letter, node in nodes.items():
        own = f"{certs}/supernode-{letter}"
        procs[f"supernode-{letter}"] = [
            "flower-supernode",
            *(
                [
                    "--root-certificates",
                    f"{certs}/ca.crt",
                    "--auth-supernode-private-key",
                    f"{own}/auth.key",
                ]
                if secure
                else ["--insecure"]
            ),
            "--superlink",
            node.link,
            "--isolation",
            "process",
            "--host",
            node_bind,
            "--port",
            node.runtime.rsplit(":", 1)[1],
            *(
                [
                    "--ssl-certfile",
                    f"{own}/server.crt",
                    "--ssl-keyfile",
                    f"{own}/server.key",
                    "--ssl-ca-certfile",
                    f"{certs}/ca.crt",
                    "--superexec-auth-secret-file",
                    f"{own}/superexec.secret",
                ]
                if secure
                else []
            ),
            "--node-config",
            f'domain="{node.domain}"',
        ]
        procs[f"superexec-clientapp-{letter}"] = [
            "flower-superexec",
            *(
                [
                    "--root-certificates",
                    f"{certs}/ca.crt",
                    "--superexec-auth-secret-file",
                    f"{own}/superexec.secret",
                ]
                if secure
                else ["--insecure"]
            ),
            "--runtime-api-address",
            node.runtime,
        ]
    return procs


def compose_commands(path: Path) -> dict[str, list[str]]:
    """The argv of every service of a compose file, with ``${VAR:-default}`` at its default."""
    services = yaml.safe_load(path.read_text())["services"]
    return {
        name: [
            re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(arg))
            for arg in [*spec["entrypoint"], *spec["command"]]
        ]
        for name, spec in services.items()
    }


@pytest.mark.parametrize(
    ("compose", "certs"),
    [("docker-compose.yml", "/app/certs"), ("docker-compose.insecure.yml", None)],
)
def test_compose_runs_the_commands_the_deployment_test_runs(
    compose: str, certs: str | None
) -> None:
    nodes = {
        letter: Node(domain, f"supernode-{letter}:9094", "superlink:8000")
        for letter, domain in (("a", "books"), ("b", "movies"))
    }
    expected = commands("superlink:8000", nodes, certs, "0.0.0.0", "0.0.0.0")
    assert compose_commands(ROOT / compose) == expected
    services = yaml.safe_load((ROOT / compose).read_text())["services"]
    assert {s["image"].split(":")[0] for s in services.values()} == {
        "flwr/superlink",
        "flwr/supernode",
        "fedmerge-superexec",
    }
    if certs is not None:  # each container holds the CA and its own party's credentials only
        for name, spec in services.items():
            mounted = {v.split(":")[1] for v in spec["volumes"] if v.startswith("./certs")}
            party = (
                "superlink"
                if name in ("superlink", "superexec-serverapp")
                else f"supernode-{name[-1]}"
            )
            assert mounted == {"/app/certs/ca.crt", f"/app/certs/{party}"}, name


class Processes:
    """The processes a test starts, each in its own process group, with logs.

    Each group is killed whole by its leader's PID.
    """

    def __init__(self, root: Path, netns: dict[str, str] | None = None) -> None:
        self.root, self.logs = root, root / "logs"
        self.logs.mkdir(parents=True)
        self.started: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}
        self.netns = netns or {}
        """The network namespace each named process runs in (none: this one)."""
        self.certs: Path | None = None
        """The credentials of a secure deployment (``fedmerge deploy certs``)."""

    def argv(self, name: str, argv: list[str]) -> list[str]:
        """`argv` with its program from this environment, in the process's namespace if any."""
        program = [str(BIN / argv[0]), *argv[1:]]
        return (
            ["ip", "netns", "exec", self.netns[name], *program] if name in self.netns else program
        )

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
                self.argv(name, argv),
                cwd=self.root,
                env=self.env(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        self.named[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the process group of `name`, as a machine that goes down."""
        os.killpg(self.named[name].pid, signal.SIGKILL)
        self.named[name].wait(timeout=10)

    def flwr_start(self, *args: str) -> subprocess.Popen[bytes]:
        """Start the ``flwr`` CLI from the repository root, its stdout piped.

        See :meth:`output`.
        """
        with open(self.logs / "flwr.log", "ab") as log:
            proc = subprocess.Popen(
                self.argv("flwr", ["flwr", *args]),
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
    port: int,
    proc: subprocess.Popen[bytes],
    processes: Processes,
    timeout: float = 60,
    host: str = "127.0.0.1",
    netns: str | None = None,
) -> None:
    """Return once ``host:port`` (seen from `netns`, if given) accepts connections.

    Fail if `proc` exits or the time is up.
    """
    probe = f"import socket, sys; sys.exit(socket.socket().connect_ex(({host!r}, {port})))"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with code {proc.returncode}:{processes.tails()}")
        if netns is None:
            with socket.socket() as sock:
                if sock.connect_ex((host, port)) == 0:
                    return
        elif (
            subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe]).returncode
            == 0
        ):
            return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on {host}:{port} after {timeout:.0f} s:{processes.tails()}")


class Namespaces:
    """Network namespaces: the SuperLink's, and one per party joined to it by a veth pair.

    A party's namespace holds loopback and its veth only, and the SuperLink's namespace does not
    forward, so a party reaches the SuperLink and nothing else (nor any other party).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix, self.names = prefix, []

    def add(self, name: str) -> str:
        """Create namespace PREFIX-NAME with loopback up; its name."""
        full = f"{self.prefix}-{name}"
        subprocess.run(["ip", "netns", "add", full], check=True)
        self.names.append(full)
        subprocess.run(["ip", "-n", full, "link", "set", "lo", "up"], check=True)
        return full

    def join(self, hub: str, party: str, subnet: int) -> tuple[str, str]:
        """A veth pair between `hub` and `party` on 10.200.SUBNET.0/30: (hub address, party's)."""
        ends = [(hub, f"veth{subnet}", f"10.200.{subnet}.1"), (party, "veth", f"10.200.{subnet}.2")]
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                ends[0][1],
                "netns",
                hub,
                "type",
                "veth",
                "peer",
                "name",
                ends[1][1],
                "netns",
                party,
            ],
            check=True,
        )
        for ns, dev, address in ends:
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{address}/30", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        return ends[0][2], ends[1][2]

    def delete(self) -> None:
        """Delete every namespace created (their veths go with them)."""
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def leftover(self) -> list[str]:
        """Namespaces of this prefix that still exist."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        return [
            line.split()[0]
            for line in listed.stdout.splitlines()
            if line.startswith(self.prefix + "-")
        ]


def write_connection(processes: Processes, name: str, address: str, tls: str) -> None:
    """The ``flwr`` connection CONNECTION of process `name`: `address`, TLS line `tls`."""
    (Path(processes.env(name)["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{tls}\n'
    )


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Processes]:
    """SuperLink, two SuperNodes (synth-0, synth-1) and three SuperExecs on loopback.

    Yields a ``flwr`` connection to them.
    """
    link_port, *node_ports = free_ports(3)
    link = f"127.0.0.1:{link_port}"
    nodes = {
        letter: Node(domain, f"127.0.0.1:{port}", link)
        for letter, domain, port in (
            ("a", "synth-0", node_ports[0]),
            ("b", "synth-1", node_ports[1]),
        )
    }
    processes = Processes(tmp_path / "deployment")
    try:
        for name, argv in commands(link, nodes, None, "127.0.0.1", "127.0.0.1").items():
            proc = processes.start(name, argv)
            if name == "superlink":
                wait_for_port(link_port, proc, processes)
        write_connection(processes, "flwr", link, "insecure = true")
        yield processes
    finally:
        processes.stop()
    leftover = processes.leftover()
    assert not leftover, f"processes left running: {leftover}"


@pytest.fixture
def secure_deployment(tmp_path: Path) -> Iterator[Processes]:
    """The secure deployment (docker-compose.yml's commands), each party apart.

    The SuperLink and the ServerApp's SuperExec (and ``flwr``) run in one network namespace; each
    SuperNode with its SuperExec in its own, joined to the SuperLink's by a veth pair. TLS
    everywhere, SuperNodes registered by their keys. Every process and namespace is removed at
    the end, also on failure.
    """
    spaces = Namespaces(f"fm{os.getpid()}")
    processes = Processes(tmp_path / "deployment")
    try:
        hub = spaces.add("link")
        joined = {
            letter: spaces.join(hub, spaces.add(letter), i + 1)
            for i, letter in enumerate(("a", "b"))
        }
        certs = tmp_path / "certs"
        issue(
            certs,
            ["superlink", "127.0.0.1", *(hub_end for hub_end, _ in joined.values())],
            {letter: ["127.0.0.1"] for letter in joined},
        )
        nodes = {
            letter: Node(domain, "127.0.0.1:9094", f"{joined[letter][0]}:8000")
            for letter, domain in (("a", "synth-0"), ("b", "synth-1"))
        }
        processes.netns = {"superlink": hub, "superexec-serverapp": hub, "flwr": hub} | {
            f"{kind}-{letter}": f"{spaces.prefix}-{letter}"
            for letter in nodes
            for kind in ("supernode", "superexec-clientapp")
        }
        write_connection(
            processes, "flwr", "127.0.0.1:8000", f'root-certificates = "{certs / "ca.crt"}"'
        )
        for name, argv in commands(
            "127.0.0.1:8000", nodes, str(certs), "0.0.0.0", "127.0.0.1"
        ).items():
            if name == "supernode-a":  # the SuperLink admits registered SuperNodes only
                for letter in nodes:
                    processes.flwr(
                        "supernode",
                        "register",
                        str(certs / f"supernode-{letter}" / "auth.pub"),
                        CONNECTION,
                        timeout=60,
                    )
            proc = processes.start(name, argv)
            if name == "superlink":
                wait_for_port(8000, proc, processes, netns=hub)
        processes.certs = certs
        yield processes
    finally:
        processes.stop()
        spaces.delete()
    leftover = processes.leftover()
    assert not leftover, f"processes left running: {leftover}"
    assert not spaces.leftover(), f"namespaces left: {spaces.leftover()}"


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


def test_secure_deployed_run_with_update_dp_matches_inprocess(
    secure_deployment: Processes, tmp_path: Path, cache: Path
) -> None:
    private = ["privacy.mechanism=update-dp", "privacy.noise_multiplier=0.5", "privacy.clip=0.5"]
    run_config = {
        "config": "",
        "set": ";".join([*OVERRIDES, *private]),
        "out": str(tmp_path / "deployed"),
    }
    deployed, inprocess = run_both(secure_deployment, run_config, tmp_path / "inprocess")
    assert deployed == inprocess
    record = json.loads((tmp_path / "deployed" / "run.json").read_text())
    assert "update-dp" in json.dumps(record["privacy"]), record
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


def test_secure_deployed_woven_run_matches_inprocess(
    secure_deployment: Processes, tmp_path: Path, cache: Path
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
        "weave.visits=1",
        "timeout_minutes=3",
    ]
    run_config = {"config": "weaverec", "set": ";".join(overrides), "out": str(tmp_path / "out")}
    deployed, inprocess = run_both(secure_deployment, run_config, tmp_path / "inprocess")
    assert deployed == inprocess
    assert {r["domain"] for r in deployed} == {"synth-0"}
    assert "woven merge (average)" in {r["model"] for r in deployed}


def test_secure_deployment_refuses_strangers(secure_deployment: Processes, tmp_path: Path) -> None:
    """An unregistered SuperNode key, a party without the CA, ``flwr`` without the CA: refused."""
    processes, certs = secure_deployment, secure_deployment.certs
    assert certs is not None
    issue(tmp_path / "stranger", ["superlink"], {"x": ["127.0.0.1"]})
    link = "10.200.1.1:8000"  # the SuperLink, from party a's namespace
    base = [
        "flower-supernode",
        "--superlink",
        link,
        "--max-retries",
        "1",
        "--max-wait-time",
        "20",
        "--node-config",
        'domain="synth-0"',
    ]
    tries = {
        "unregistered": [
            *base,
            "--root-certificates",
            str(certs / "ca.crt"),
            "--auth-supernode-private-key",
            str(tmp_path / "stranger" / "supernode-x" / "auth.key"),
        ],
        "no-ca": [
            *base,
            "--auth-supernode-private-key",
            str(certs / "supernode-a" / "auth.key"),
        ],
    }
    printed = {}
    for name, argv in tries.items():
        processes.netns[name] = processes.netns["supernode-a"]
        proc = processes.start(name, [*argv, "--port", "9190" if name == "no-ca" else "9191"])
        assert proc.wait(timeout=120) != 0, processes.tails()
        printed[name] = (processes.logs / f"{name}.log").read_text()
    assert "Failed to activate SuperNode" in printed["unregistered"], printed["unregistered"]
    assert "CERTIFICATE_VERIFY_FAILED" in printed["no-ca"], printed["no-ca"]
    # the flwr CLI with a connection that lacks the CA
    write_connection(processes, "flwr-no-ca", "127.0.0.1:8000", "")
    processes.netns["flwr-no-ca"] = processes.netns["flwr"]
    cli = processes.start("flwr-no-ca", ["flwr", "ls", CONNECTION])
    assert cli.wait(timeout=120) != 0
    assert (
        "Connection to the SuperLink is unavailable"
        in (processes.logs / "flwr-no-ca.log").read_text()
    )
    listed = processes.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=60)
    assert len(json.loads(listed)["nodes"]) == 2  # still the two registered parties only


def submit(deployment: Processes, run_config: dict[str, str]) -> str:
    """Submit a run (``flwr run`` without ``--stream``); its run id."""
    overrides = " ".join(f"{key}='{value}'" for key, value in run_config.items())
    output = deployment.flwr("run", str(ROOT), CONNECTION, "--run-config", overrides, timeout=120)
    started = re.search(r"Successfully started run (\d+)", output)
    assert started, output + deployment.tails()
    return started[1]


def wait_for(check: Callable[[], bool], what: str, deployment: Processes, timeout: float) -> float:
    """Seconds until `check` holds; fails the test naming `what` after `timeout` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s:{deployment.tails()}")
        time.sleep(1)
    return time.monotonic() - start


def logged(out: Path, event: str) -> bool:
    """Whether the run writing `out` has logged `event` (its events.jsonl in OUT.partial)."""
    events = partial_dir(out) / "events.jsonl"
    return events.exists() and f'"event": "{event}"' in events.read_text()


def run_status(deployment: Processes, run_id: str) -> str:
    """Flower's status of run `run_id`, e.g. ``running`` or ``finished:failed``."""
    listed = deployment.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=60)
    return str(json.loads(listed)["runs"][0]["status"])


SLOW = [*OVERRIDES, "train.epochs=60", "train.patience=60", "timeout_minutes=30"]
"""Training long enough to be cut short, and a wait for parties far beyond the tests' bounds."""


def training_run(deployment: Processes, out: Path) -> str:
    """Submit a :data:`SLOW` run into `out`; its run id, once its parties train."""
    run_id = submit(deployment, {"config": "", "set": ";".join(SLOW), "out": str(out)})
    wait_for(lambda: logged(out, "train_start"), "training", deployment, 180)
    return run_id


def test_a_party_killed_mid_round_fails_the_run_naming_it(
    secure_deployment: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "deployed"
    run_id = training_run(secure_deployment, out)
    secure_deployment.kill("superexec-clientapp-b")
    secure_deployment.kill("supernode-b")
    # Flower marks the node offline after two missed heartbeats (30 s apart): not 30 minutes
    seconds = wait_for(
        lambda: run_status(secure_deployment, run_id).startswith("finished"),
        "the end of the run",
        secure_deployment,
        240,
    )
    record = read_record(partial_dir(out))
    assert record is not None
    assert record["status"] == "failed", record
    assert "synth-1" in record["error"], record["error"]
    assert not out.exists()  # no results presented as complete
    print(f"killed party: run ended {seconds:.0f} s later: {record['error']}")


def test_flwr_stop_ends_a_deployed_run_as_stopped(
    secure_deployment: Processes, tmp_path: Path
) -> None:
    out = tmp_path / "deployed"
    run_id = training_run(secure_deployment, out)
    secure_deployment.flwr("stop", run_id, CONNECTION, timeout=60)
    seconds = wait_for(
        lambda: (read_record(partial_dir(out)) or {"status": "running"})["status"] != "running",
        "the run record's end",
        secure_deployment,
        120,
    )
    record = read_record(partial_dir(out))
    assert record is not None
    assert run_status(secure_deployment, run_id) == "finished:stopped"
    assert record["status"] == "interrupted", record
    assert not out.exists()
    print(f"flwr stop: recorded {seconds:.0f} s later: {record}")
