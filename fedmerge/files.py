"""Atomic file writes (a reader never sees a half-written file, a failed write leaves nothing), and the
checks that tell whose temporary files they are."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` on success, is removed on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
        raise FedmergeError(f"refusing to write {path}: its data holds a NaN or infinite number, which JSON cannot "
                            "represent; the run that computed it diverged, so check its settings and inputs") from err
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (the owner of a ``.NAME.tmp-PID`` file or a run record)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
