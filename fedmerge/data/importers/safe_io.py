"""Reading untrusted input files: regular files only, never hanging, never unbounded in memory.

A path is opened without blocking (``O_NONBLOCK``, so a FIFO with no writer cannot hang the
open) and its type is checked on the open descriptor, so the checked file is the one read.
What is read into memory is capped: a whole archive at :data:`MAX_ARCHIVE_BYTES`, one member
of an archive at :data:`MAX_MEMBER_BYTES` (checked from the member's declared size before
reading, and enforced while reading).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, BinaryIO

from fedmerge.errors import FedmergeError

MAX_ARCHIVE_BYTES = 1 << 30
"""Largest archive (or RecBole atomic file) read into memory: 1 GiB.

The largest published one is 8 MB.
"""
MAX_MEMBER_BYTES = 1 << 30
"""Largest uncompressed archive member read into memory: 1 GiB."""

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words.

    For example ``regular file``, ``directory``, ``FIFO (named pipe)``, ...
    """
    return next(
        (word for test, word in _KINDS if test(mode)),
        "regular file" if stat.S_ISREG(mode) else "special file",
    )


def check_path(path: Path, what: str, folder_ok: bool = False) -> None:
    """Refuse `path` unless it is a regular file (or a folder, where `folder_ok`).

    The check comes before anything opens it.

    Parameters
    ----------
    path : Path
        The input path (symbolic links are followed).
    what : str
        What the path should be, for the message (``a mergerec archive``).
    folder_ok : bool
        Accept a directory too (RecBole datasets are folders).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FedmergeError(f"{path} does not exist; give the path of {what}") from None
    except OSError as err:
        raise FedmergeError(
            f"{path} cannot be read ({err.strerror}); give the path of {what}"
        ) from err
    if not (stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode))):
        raise FedmergeError(
            f"{path} is not a regular file but a {file_kind(mode)}; give the path of {what}"
        )


def open_regular(path: Path, what: str) -> BinaryIO:
    """Open `path` for binary reading, refusing anything but a regular file.

    The check is made on the open file.
    """
    check_path(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise FedmergeError(
            f"{path} cannot be opened ({err.strerror}); give the path of {what}"
        ) from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # swapped for something else after check_path
        os.close(fd)
        raise FedmergeError(
            f"{path} is not a regular file but a {file_kind(mode)}; give the path of {what}"
        )
    return os.fdopen(fd, "rb")


def read_regular(path: Path, what: str) -> bytes:
    """The whole content of regular file `path`, read once, up to :data:`MAX_ARCHIVE_BYTES`.

    A larger file is refused.
    """
    with open_regular(path, what) as handle:
        data = handle.read(MAX_ARCHIVE_BYTES + 1)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise FedmergeError(
            f"{path} is larger than {MAX_ARCHIVE_BYTES:,} bytes, the most fedmerge reads into "
            f"memory; give the path of {what} of a sensible size"
        )
    return data


def check_member_size(path: Path, member: str, size: int) -> None:
    """Refuse archive member `member` of `path` whose uncompressed `size` is too large.

    The limit is :data:`MAX_MEMBER_BYTES`.
    """
    if size > MAX_MEMBER_BYTES:
        raise FedmergeError(
            f"{path}: member {member} unpacks to {size:,} bytes, more than the "
            f"{MAX_MEMBER_BYTES:,} fedmerge reads into memory; the archive is not a dataset of the "
            "expected kind"
        )


def read_member(handle: IO[bytes], path: Path, member: str, size: int) -> bytes:
    """Read archive member `member` (declared `size`) from `handle`, up to :data:`MAX_MEMBER_BYTES`.

    More than that is refused.
    """
    check_member_size(path, member, size)
    data = handle.read(MAX_MEMBER_BYTES + 1)
    check_member_size(path, member, len(data))
    return data
