"""Output folders that never lose a finished run, and records that tell a live run from a dead one.

``fedmerge train``, ``merge``, ``evaluate --out`` and ``simulate`` write into ``OUT.partial/``,
a sibling of ``--out``, and only once the command has finished does that folder replace
``OUT``: so ``OUT`` only ever holds a complete run, and a command that fails (a mistyped
domain, a bad ``--set``, a party that errs, Ctrl-C) leaves the previous run in ``OUT`` byte for
byte. A folder is replaced only by the command that wrote it (``train`` never overwrites a
``simulate`` run), and a non-empty folder that fedmerge did not write is never touched.

``run.json`` in the folder is the run's record: the command, its status (``running``,
``complete``, ``failed``, ``interrupted``), the PID and host that write it and a heartbeat
renewed every :data:`HEARTBEAT_SECONDS`, so a reader (``fedmerge status``, or the next
command given the same ``--out``) can tell a run that is still going from one that was
killed. A killed run's ``OUT.partial/`` keeps what it had: a training run resumes from it
when the same command is given again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from fedmerge.errors import FedmergeError
from fedmerge.files import pid_alive, swap_folder, write_json

RECORD = "run.json"
HEARTBEAT_SECONDS = 30.0
Liveness = Literal["ended", "live", "dead"]


def partial_dir(out: Path) -> Path:
    """Where the run for `out` is written until it has finished: the sibling ``OUT.partial``."""
    return out.with_name(out.name + ".partial")


def read_record(folder: Path) -> dict[str, Any] | None:
    """The run record (``run.json``) of `folder`.

    None when there is none or it is not a JSON object.
    """
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def command_of(folder: Path) -> str | None:
    """Which fedmerge command wrote `folder` (None: not fedmerge, or empty).

    Folders written before run records carried a ``command`` are recognised by their files.
    """
    record = read_record(folder)
    if record is not None:
        return str(record.get("command", "simulate"))
    files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if "config.json" in files and {"merged.safetensors", "coefficients.json"} <= files:
        return "merge"
    if "config.json" in files and files & {"model.safetensors", "base.safetensors"}:
        return "train"
    return None


def liveness(record: dict[str, Any], now: float | None = None) -> Liveness:
    """``ended`` when the record's status is final; else ``live`` or ``dead``.

    On this host a run is live while its PID exists and its heartbeat is recent (a reused PID
    has no recent heartbeat); on another host, while its heartbeat is recent.
    """
    if record.get("status") != "running":
        return "ended"
    age = (now or time.time()) - float(record.get("heartbeat", 0.0))
    recent = age < 3 * HEARTBEAT_SECONDS
    if record.get("host") == socket.gethostname():
        return "live" if recent and pid_alive(int(record.get("pid", -1))) else "dead"
    return "live" if recent else "dead"


def check_out(out: Path, command: str) -> None:
    """Refuse an `out` that is not a folder, or that holds something `command` must not replace.

    Parameters
    ----------
    out : Path
        The ``--out`` of `command`.
    command : str
        ``train``, ``merge``, ``evaluate`` or ``simulate``.
    """
    if out.exists() and not out.is_dir():
        raise FedmergeError(
            f"--out {out} is a file; give a folder (it is created, or replaced once the run "
            "finished)"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    owner = command_of(out)
    if owner is None:
        raise FedmergeError(
            f"--out {out} is not empty and was not written by fedmerge; give a new or empty folder "
            f"(a finished run replaces --out as a whole)"
        )
    if owner != command:
        raise FedmergeError(
            f"--out {out} holds a `fedmerge {owner}` run, which `fedmerge {command}` would "
            "replace; give another --out"
        )


class Output:
    """A run being written into ``OUT.partial``.

    Its record, heartbeat, and the swap into ``OUT`` on success.

    Parameters
    ----------
    out : Path
        The ``--out`` folder (checked with :func:`check_out`).
    command : str
        The command writing it (recorded; a folder is only replaced by the same command).
    inputs : dict
        What defines the run (recorded in ``run.json``; a resumed run must have the same).
    resume : bool
        Keep an interrupted run's ``OUT.partial`` of the same `inputs` (its state is resumed);
        one of other inputs is refused, naming the difference. Without `resume`, a dead run's
        ``OUT.partial`` is cleared.
    """

    def __init__(
        self, out: Path, command: str, inputs: dict[str, Any], resume: bool = False
    ) -> None:
        self.out, self.dir = Path(out), partial_dir(Path(out))
        check_out(self.out, command)
        self._clear_or_resume(command, inputs, resume)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record: dict[str, Any] = {
            "command": command,
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "heartbeat": time.time(),
            "inputs": inputs,
        }
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.write_record()
        self._beat = threading.Thread(
            target=self._heartbeat, name="fedmerge-heartbeat", daemon=True
        )
        self._beat.start()

    def _clear_or_resume(self, command: str, inputs: dict[str, Any], resume: bool) -> None:
        if not self.dir.exists():
            return
        if not self.dir.is_dir():
            raise FedmergeError(
                f"{self.dir} is a file; remove it, fedmerge writes the run there until it finished"
            )
        record = read_record(self.dir)
        if record is not None and liveness(record) == "live":
            raise FedmergeError(
                f"another fedmerge {record.get('command', '')} (PID {record.get('pid')} on "
                f"{record.get('host')}) is writing {self.dir}; wait for it, stop it, or give "
                "another --out"
            )
        if record is None and any(self.dir.iterdir()):
            raise FedmergeError(
                f"{self.dir} holds files but no run record ({RECORD}); remove it by hand "
                "(fedmerge does not delete what it cannot recognise)"
            )
        if resume and record is not None and record.get("command") == command:
            before = record.get("inputs", {})
            if before == inputs:
                return
            raise FedmergeError(
                f"{self.dir} holds an unfinished {command} run with other inputs "
                f"({difference(inputs, before)}); give the same inputs to resume it, or remove "
                f"{self.dir} to start afresh"
            )
        shutil.rmtree(self.dir)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self.record["status"] == "running":
                    self.record["heartbeat"] = time.time()
                    self.write_record()

    def write_record(self) -> None:
        """Write ``run.json`` now."""
        write_json(self.dir / RECORD, self.record)

    def update(self, **facts: Any) -> None:
        """Add `facts` to the record."""
        with self._lock:
            self.record |= facts
            self.write_record()

    def end(self, status: str, keep: bool = True, **facts: Any) -> None:
        """Record a final status other than ``complete``.

        ``OUT`` is untouched, ``OUT.partial`` kept if `keep`.
        """
        self._stop.set()
        with self._lock:
            self.record |= {"status": status, "ended": time.strftime("%Y-%m-%dT%H:%M:%S"), **facts}
            if keep:
                self.write_record()
            else:
                shutil.rmtree(self.dir, ignore_errors=True)

    @contextmanager
    def writing(self, keep: Callable[[], bool] = lambda: False) -> Iterator[Path]:
        """Yield the folder to write.

        On success it replaces ``OUT``; on an error or Ctrl-C the record says so.

        `keep` tells, after a failure, whether ``OUT.partial`` holds something worth keeping
        (a trainer state to resume); otherwise it is removed, and no empty folder is left.
        """
        try:
            yield self.dir
        except KeyboardInterrupt:
            self.end("interrupted", keep=keep())
            raise
        except BaseException as err:
            self.end("failed", keep=keep(), error=f"{type(err).__name__}: {err}")
            raise
        self.commit()

    def commit(self, **facts: Any) -> None:
        """Record ``complete`` and replace ``OUT`` with the finished folder."""
        self._stop.set()
        with self._lock:
            self.record |= {
                "status": "complete",
                "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **facts,
            }
            self.write_record()
            swap_folder(self.dir, self.out)


def difference(now: dict[str, Any], before: dict[str, Any]) -> str:
    """The first (dotted) keys whose values differ, as ``key: A now, B before``."""
    now, before = _flat(now), _flat(before)
    keys = [k for k in dict.fromkeys([*now, *before]) if now.get(k) != before.get(k)]
    return "; ".join(
        f"{k}: {_short(now.get(k))} now, {_short(before.get(k))} before" for k in keys[:3]
    )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
