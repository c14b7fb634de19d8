"""SeqRecBenchmark ``proc.zip``: pickled pandas DataFrames ``user2item.pkl`` and ``item2title.pkl``.

Unpickling runs code from the file, so an archive is only opened when its sha256 is pinned in
the registry or the caller explicitly allows pickles (``--allow-pickle``). The file is read
once into memory (at most ``safe_io.MAX_ARCHIVE_BYTES``), and the bytes that were hashed are
the bytes that are unzipped: a file swapped on disk after the check is never read. Each member
is read only if its uncompressed size is at most ``safe_io.MAX_MEMBER_BYTES``.

User and item ids must be integers, each user appears in one row, each item in one title row,
and timestamps (when present) are finite numbers, one per item.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from fedmerge.data.domain import DomainData, from_sequences
from fedmerge.data.importers import safe_io
from fedmerge.data.registry import PINNED_SHA256
from fedmerge.errors import FedmergeError


def _unpickle_frame(
    archive: zipfile.ZipFile, member: str, columns: tuple[str, ...], path: Path
) -> pd.DataFrame:
    """Read one pickled DataFrame from the zip (size-capped) and check its columns."""
    infos = {info.filename.rsplit("/", 1)[-1]: info for info in archive.infolist()}
    if member not in infos:
        raise FedmergeError(
            f"{path} is not a SeqRecBenchmark proc.zip: it lacks {member} "
            "(expected user2item.pkl and item2title.pkl)"
        )
    info = infos[member]
    safe_io.check_member_size(path, member, info.file_size)
    with archive.open(info) as handle:
        data = safe_io.read_member(handle, path, member, info.file_size)
    try:
        frame = pd.read_pickle(io.BytesIO(data))
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
    ) as err:
        raise FedmergeError(
            f"{path}: {member} is not a readable pickled DataFrame ({err}); the archive is corrupt"
        ) from err
    if not isinstance(frame, pd.DataFrame) or not set(columns) <= set(frame.columns):
        raise FedmergeError(
            f"{path}: {member} is not a DataFrame with columns {', '.join(columns)}"
        )
    return frame


def _int_ids(values: object, path: Path, where: str) -> list[int]:
    """`values` (a list or array of ids) as Python ints.

    Anything but integers is an error naming `where`.
    """
    if not isinstance(values, (list, tuple, np.ndarray, pd.Series)):
        raise FedmergeError(
            f"{path}: {where} is {type(values).__name__}, not a list of integer ids; "
            "the archive is not a SeqRecBenchmark proc.zip"
        )
    bad = next(
        (
            v
            for v in values
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
        ),
        None,
    )
    if bad is not None:
        raise FedmergeError(
            f"{path}: {where} holds the id {bad!r}, which is not an integer; "
            "SeqRecBenchmark ids are integers: fix that value"
        )
    return [int(v) for v in values]


def _order(stamps: object, n_items: int, path: Path, row: int) -> np.ndarray | range:
    """The time order of one user's items (stable), or file order without timestamps."""
    if stamps is None:
        return range(n_items)
    try:
        times = np.asarray(stamps, dtype=np.float64)
    except (TypeError, ValueError):
        times = np.array(np.nan)
    if times.ndim == 1 and len(times) != n_items:
        raise FedmergeError(
            f"{path}: user row {row} has {n_items} items but {len(times)} timestamps"
        )
    if times.ndim != 1 or not np.isfinite(times).all():
        raise FedmergeError(
            f"{path}: user row {row} has a timestamp that is not a finite number; "
            "give every interaction a numeric timestamp"
        )
    return np.argsort(times, kind="stable")


def _load_frames(path: Path, allow_pickle: bool) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The two DataFrames of the archive and its sha256, from one read of the file."""
    data = safe_io.read_regular(path, "a SeqRecBenchmark proc.zip")
    digest = hashlib.sha256(data).hexdigest()
    if digest not in PINNED_SHA256 and not allow_pickle:
        raise FedmergeError(
            f"{path} holds pickles, which run code when loaded, and its sha256 {digest} is not "
            "pinned in the registry; pass --allow-pickle only if you trust where the file came "
            "from"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            users = _unpickle_frame(archive, "user2item.pkl", ("UserID", "ItemID"), path)
            titles = _unpickle_frame(archive, "item2title.pkl", ("ItemID", "Title"), path)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as err:
        raise FedmergeError(
            f"{path} is not a readable zip archive (truncated or corrupt: {err}); "
            "download it again or check --format"
        ) from err
    return users, titles, digest


def read_seqrec_zip(path: Path, name: str, allow_pickle: bool = False) -> DomainData:
    """Import a SeqRecBenchmark ``proc.zip`` as domain `name` (leave-one-out on time order)."""
    users, titles, digest = _load_frames(Path(path), allow_pickle)
    if titles.empty:
        raise FedmergeError(
            f"{path}: item2title.pkl holds no items; the archive has no item metadata"
        )
    titles = titles.sort_values("ItemID", kind="stable")
    raw_items = _int_ids(titles["ItemID"].to_numpy(), path, "item2title.pkl's ItemID column")
    user_ids = _int_ids(users["UserID"].to_numpy(), path, "user2item.pkl's UserID column")
    for what, ids, member in (
        ("item", raw_items, "item2title.pkl"),
        ("user", user_ids, "user2item.pkl"),
    ):
        repeated, count = Counter(ids).most_common(1)[0] if ids else (None, 0)
        if count > 1:
            raise FedmergeError(
                f"{path}: {what} {repeated} has {count} rows in {member}; each {what} must appear "
                "once"
            )
    index = {item: pos for pos, item in enumerate(raw_items)}
    sequences = []
    stamps_column = users["Timestamp"] if "Timestamp" in users.columns else [None] * len(users)
    for row, (items, stamps) in enumerate(zip(users["ItemID"], stamps_column, strict=True)):
        ids = _int_ids(items, path, f"user row {row}'s ItemID")
        try:
            sequences.append([index[ids[i]] for i in _order(stamps, len(ids), path, row)])
        except KeyError as err:
            raise FedmergeError(
                f"{path}: user row {row} refers to item {err.args[0]} that item2title.pkl lacks"
            ) from None
    text = {"title": ["" if pd.isna(title) else str(title) for title in titles["Title"]]}
    return from_sequences(
        name,
        [str(i) for i in raw_items],
        text,
        [str(u) for u in user_ids],
        sequences,
        source={"format": "seqrec-zip", "path": str(path), "sha256": digest},
    )
