"""SeqRecBenchmark ``proc.zip``: pickled pandas DataFrames ``user2item.pkl`` and ``item2title.pkl``.

Unpickling runs code from the file, so an archive is only opened when its sha256 is pinned in
the registry or the caller explicitly allows pickles (``--allow-pickle``).
"""

from __future__ import annotations

import io
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from fedmerge.data.domain import DomainData, from_sequences
from fedmerge.data.download import sha256_of
from fedmerge.data.registry import PINNED_SHA256
from fedmerge.errors import FedmergeError


def _unpickle_frame(archive: zipfile.ZipFile, member: str, columns: tuple[str, ...], path: Path) -> pd.DataFrame:
    """Read one pickled DataFrame from the zip and check its columns."""
    names = {info.filename.rsplit("/", 1)[-1]: info.filename for info in archive.infolist()}
    if member not in names:
        raise FedmergeError(f"{path} is not a SeqRecBenchmark proc.zip: it lacks {member} "
                            "(expected user2item.pkl and item2title.pkl)")
    try:
        frame = pd.read_pickle(io.BytesIO(archive.read(names[member])))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise FedmergeError(f"{path}: {member} is not a readable pickled DataFrame ({err}); the archive is corrupt") from err
    if not isinstance(frame, pd.DataFrame) or not set(columns) <= set(frame.columns):
        raise FedmergeError(f"{path}: {member} is not a DataFrame with columns {', '.join(columns)}")
    return frame


def read_seqrec_zip(path: Path, name: str, allow_pickle: bool = False) -> DomainData:
    """Import a SeqRecBenchmark ``proc.zip`` as domain `name` (leave-one-out on time order)."""
    if not path.is_file():
        raise FedmergeError(f"{path} is not a file; give the path of a SeqRecBenchmark proc.zip")
    digest = sha256_of(path)
    if digest not in PINNED_SHA256 and not allow_pickle:
        raise FedmergeError(f"{path} holds pickles, which run code when loaded, and its sha256 {digest} is not pinned "
                            "in the registry; pass --allow-pickle only if you trust where the file came from")
    try:
        with zipfile.ZipFile(path) as archive:
            users = _unpickle_frame(archive, "user2item.pkl", ("UserID", "ItemID"), path)
            titles = _unpickle_frame(archive, "item2title.pkl", ("ItemID", "Title"), path)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        raise FedmergeError(f"{path} is not a readable zip archive (truncated or corrupt: {err}); "
                            "download it again or check --format") from err
    titles = titles.sort_values("ItemID", kind="stable")
    raw_items = titles["ItemID"].to_numpy()
    index = {int(item): pos for pos, item in enumerate(raw_items)}
    sequences = []
    for row, (items, stamps) in enumerate(zip(users["ItemID"], users.get("Timestamp", [None] * len(users)), strict=True)):
        if stamps is not None and len(stamps) != len(items):
            raise FedmergeError(f"{path}: user row {row} has {len(items)} items but {len(stamps)} timestamps")
        order = np.argsort(np.asarray(stamps), kind="stable") if stamps is not None else range(len(items))
        try:
            sequences.append([index[int(items[i])] for i in order])
        except KeyError as err:
            raise FedmergeError(f"{path}: user row {row} refers to item {err.args[0]} that item2title.pkl lacks") from None
    text = {"title": ["" if pd.isna(title) else str(title) for title in titles["Title"]]}
    return from_sequences(name, [str(int(i)) for i in raw_items], text, [str(u) for u in users["UserID"]],
                          sequences, source={"format": "seqrec-zip", "path": str(path), "sha256": digest})
