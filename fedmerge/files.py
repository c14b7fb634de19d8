"""Atomic writes of files and folders, and the sweep of temporary files of killed writers.

A reader never sees a half-written file or folder, and a failed write leaves nothing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError

STALE_AFTER_S = 60.0
"""A dead process's temporary file untouched this long is removed (:func:`remove_stale_temps`)."""


def _temp_prefix(path: Path) -> str:
    """The name of `path`'s temporary siblings, before the writer's PID: ``.NAME.tmp-``."""
    return f".{path.name}.tmp-"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write.

    It replaces `path` on success and is removed on failure.
    """
    tmp = path.with_name(f"{_temp_prefix(path)}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically.

    Raises
    ------
    FedmergeError
        When `data` holds a NaN or infinite float (not JSON); nothing is written then.
    """
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError as err:
        raise FedmergeError(
            f"refusing to write {path}: its data holds a NaN or infinite number, which JSON cannot "
            "represent; the run that computed it diverged, so check its settings and inputs"
        ) from err
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary siblings of `final` whose process is gone; return them.

    The siblings are those :func:`atomic_path` writes.

    A killed writer (``kill -9``) leaves one behind. A temporary file of a live process (a
    concurrent writer) is kept, and so is one modified in the last :data:`STALE_AFTER_S` seconds
    (it may belong to a process on another machine sharing the folder).
    """
    prefix = _temp_prefix(final)
    removed = []
    for tmp in final.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix) :]
        try:
            if (
                pid.isdigit()
                and not pid_alive(int(pid))
                and time.time() - tmp.stat().st_mtime > STALE_AFTER_S
            ):
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # removed by a concurrent writer
            continue
    return removed


def swap_folder(new: Path, target: Path, complete: Callable[[Path], bool] | None = None) -> None:
    """Put the finished folder `new` in place of `target`, which may not exist.

    An existing `target` is moved aside first, put back if the swap fails (the OSError is
    raised), and removed once `new` is in place: a reader finds the old folder or the new one.
    When the swap fails because another writer put a folder at `target` meanwhile that
    `complete` accepts, that folder is kept and nothing is raised.
    """
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, old)
        except FileNotFoundError:  # a concurrent writer moved it first
            old.rmdir()
            old = None
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
            raise
        if complete is None or not complete(target):
            raise
        return  # a concurrent writer finished first; keep its copy
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine.

    `pid` is the owner of a ``.NAME.tmp-PID`` file or of a run record.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
