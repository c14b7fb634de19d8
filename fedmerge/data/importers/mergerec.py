"""MergeRec tarballs: ``<Domain>/{train,val,test,smap,umap,meta_data}.json`` in a .tar.gz.

The split is taken exactly as published: train.json holds each user's training sequence
(oldest first), val.json and test.json one target each (some users have none).
"""

from __future__ import annotations

import json
import tarfile
import zlib
from pathlib import Path

import numpy as np

from fedmerge.data.domain import NO_TARGET, TEXT_FIELDS, DomainData
from fedmerge.errors import FedmergeError

_MEMBERS = ("train.json", "val.json", "test.json", "smap.json", "umap.json", "meta_data.json")


def _read_members(path: Path) -> dict[str, object]:
    """Parse the six JSON members of the tarball (whatever the top folder is called)."""
    found: dict[str, object] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in _MEMBERS and base not in found:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    found[base] = json.loads(handle.read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise FedmergeError(f"{path} is not a readable MergeRec tarball (truncated or corrupt: {err}); "
                            "download it again or check --format") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FedmergeError(f"{path}: a JSON file inside is malformed ({err}); the archive is corrupt") from err
    missing = [m for m in _MEMBERS if m not in found]
    if missing:
        raise FedmergeError(f"{path} is not a MergeRec tarball: it lacks {', '.join(missing)} "
                            "(expected <Domain>/train.json, val.json, test.json, smap.json, umap.json, meta_data.json)")
    return found


def _inverse(mapping: dict[str, int], what: str, path: Path) -> list[str]:
    """Original ids indexed by their contiguous integer id."""
    ids = [""] * len(mapping)
    for original, index in mapping.items():
        if not 0 <= int(index) < len(ids) or ids[int(index)]:
            raise FedmergeError(f"{path}: {what} ids are not contiguous from 0; the archive is not a MergeRec split")
        ids[int(index)] = original
    return ids


def read_mergerec(path: Path, name: str) -> DomainData:
    """Import a MergeRec tarball as domain `name`."""
    parts = _read_members(path)
    item_ids = _inverse(parts["smap.json"], "item", path)  # type: ignore[arg-type]
    user_ids = _inverse(parts["umap.json"], "user", path)  # type: ignore[arg-type]
    meta: dict[str, dict[str, str]] = parts["meta_data.json"]  # type: ignore[assignment]
    text = {key: [str((meta.get(asin) or {}).get(key) or "") for asin in item_ids] for key in TEXT_FIELDS}
    text = {key: values for key, values in text.items() if any(values)}
    train: dict[str, list[int]] = parts["train.json"]  # type: ignore[assignment]
    for split in ("train.json", "val.json", "test.json"):
        _check_users(parts[split], len(user_ids), f"{path}: {split}")  # type: ignore[arg-type]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    sequences = [train.get(str(user), []) for user in range(len(user_ids))]
    offsets[1:] = np.cumsum([len(seq) for seq in sequences])
    return DomainData(
        name=name, item_ids=item_ids, item_text=text, user_ids=user_ids, train_offsets=offsets,
        train_items=np.fromiter((i for seq in sequences for i in seq), dtype=np.int64, count=int(offsets[-1])),
        valid=_targets(parts["val.json"], len(user_ids)), test=_targets(parts["test.json"], len(user_ids)),  # type: ignore[arg-type]
        source={"format": "mergerec", "path": str(path)},
    )


def _check_users(split: dict[str, list[int]], n_users: int, where: str) -> None:
    """Every user key of a split file must be one of umap's ids 0..n_users-1."""
    bad = [user for user in split if not (user.isdigit() and int(user) < n_users)]
    if bad:
        raise FedmergeError(f"{where} has user {bad[0]!r}, which is not a user id of umap.json (0..{n_users - 1}); "
                            "the archive is not a consistent MergeRec split")


def _targets(split: dict[str, list[int]], n_users: int) -> np.ndarray:
    """One target per user from a ``{user: [item]}`` file, -1 where absent."""
    out = np.full(n_users, NO_TARGET, dtype=np.int64)
    for user, items in split.items():
        if items:
            out[int(user)] = items[-1]
    return out
