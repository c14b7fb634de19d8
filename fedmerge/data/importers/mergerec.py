"""MergeRec tarballs: ``<Domain>/{train,val,test,smap,umap,meta_data}.json`` in a .tar.gz.

The split is taken exactly as published: train.json holds each user's training sequence
(oldest first), val.json and test.json one target each (some users have none).

Refused, naming the member and the user or id: a member larger than
``safe_io.MAX_MEMBER_BYTES`` (checked before it is read), a member of the wrong JSON shape,
ids that are not integers, user keys that are not canonical user ids of umap.json, several
targets for one user, a meta_data.json that describes none of the items, and a split without
users or interactions.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import TypeGuard, cast

import numpy as np

from fedmerge.data.domain import NO_TARGET, TEXT_FIELDS, DomainData, check_not_empty
from fedmerge.data.importers import safe_io
from fedmerge.errors import FedmergeError

_MEMBERS = ("train.json", "val.json", "test.json", "smap.json", "umap.json", "meta_data.json")
_USER_KEY = re.compile(r"0|[1-9][0-9]*")


def _read_members(path: Path) -> dict[str, dict[str, object]]:
    """Parse the six JSON members of the tarball (whatever the top folder is called)."""
    found: dict[str, object] = {}
    try:
        with (
            safe_io.open_regular(path, "a MergeRec .tar.gz") as raw,
            tarfile.open(fileobj=raw, mode="r:*") as archive,
        ):
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in _MEMBERS and base not in found:
                    safe_io.check_member_size(path, base, member.size)
                    handle = archive.extractfile(member)
                    assert handle is not None
                    found[base] = json.loads(safe_io.read_member(handle, path, base, member.size))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise FedmergeError(
            f"{path} is not a readable MergeRec tarball (truncated or corrupt: {err}); "
            "download it again or check --format"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise FedmergeError(
            f"{path}: a JSON file inside is malformed ({err}); the archive is corrupt"
        ) from err
    missing = [m for m in _MEMBERS if m not in found]
    if missing:
        raise FedmergeError(
            f"{path} is not a MergeRec tarball: it lacks {', '.join(missing)} (expected "
            "<Domain>/train.json, val.json, test.json, smap.json, umap.json, meta_data.json)"
        )
    members: dict[str, dict[str, object]] = {}
    for base in _MEMBERS:
        value = found[base]
        if not isinstance(value, dict):
            raise FedmergeError(
                f"{path}: {base} holds a JSON {type(value).__name__}, not an object; "
                "the archive is not a MergeRec split"
            )
        members[base] = value
    return members


def _is_int(value: object) -> TypeGuard[int]:
    """A JSON integer (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _inverse(mapping: dict[str, object], what: str, path: Path) -> list[str]:
    """Original ids indexed by their contiguous integer id."""
    ids = [""] * len(mapping)
    for original, index in mapping.items():
        if not _is_int(index):
            raise FedmergeError(
                f"{path}: {what} {original!r} maps to {index!r}, which is not an integer id; "
                "the archive is not a MergeRec split"
            )
        if not 0 <= index < len(ids) or ids[index]:
            raise FedmergeError(
                f"{path}: {what} ids are not contiguous from 0; the archive is not a MergeRec split"
            )
        ids[index] = original
    return ids


def _item_text(meta: dict[str, object], item_ids: list[str], path: Path) -> dict[str, list[str]]:
    """Title, brand and category per item (fields no item has are dropped)."""
    if not any(asin in meta for asin in item_ids):
        raise FedmergeError(
            f"{path}: meta_data.json describes none of the {len(item_ids)} items of smap.json; "
            "the archive's item metadata is empty or belongs to another split"
        )
    entries: list[dict[str, object]] = []
    for asin in item_ids:
        entry = meta.get(asin) or {}
        if not isinstance(entry, dict):
            raise FedmergeError(
                f"{path}: meta_data.json's entry for item {asin!r} is not an object of text fields"
            )
        entries.append(entry)
    text = {key: [str(entry.get(key) or "") for entry in entries] for key in TEXT_FIELDS}
    return {key: values for key, values in text.items() if any(values)}


def read_mergerec(path: Path, name: str) -> DomainData:
    """Import a MergeRec tarball as domain `name`."""
    parts = _read_members(path)
    item_ids = _inverse(parts["smap.json"], "item", path)
    user_ids = _inverse(parts["umap.json"], "user", path)
    text = _item_text(parts["meta_data.json"], item_ids, path)
    splits = {
        split: _check_split(parts[split], user_ids, len(item_ids), path, split)
        for split in ("train.json", "val.json", "test.json")
    }
    train = splits["train.json"]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    sequences = [train.get(str(user), []) for user in range(len(user_ids))]
    offsets[1:] = np.cumsum([len(seq) for seq in sequences])
    domain = DomainData(
        name=name,
        item_ids=item_ids,
        item_text=text,
        user_ids=user_ids,
        train_offsets=offsets,
        train_items=np.fromiter(
            (i for seq in sequences for i in seq), dtype=np.int64, count=int(offsets[-1])
        ),
        valid=_targets(splits["val.json"], len(user_ids)),
        test=_targets(splits["test.json"], len(user_ids)),
        source={"format": "mergerec", "path": str(path)},
    )
    check_not_empty(domain, str(path))
    return domain


def _check_split(
    split: dict[str, object], user_ids: list[str], n_items: int, path: Path, member: str
) -> dict[str, list[int]]:
    """Check `split`: its keys are umap's user ids, its values lists of item ids; return it.

    Keys are user ids 0..n_users-1 (written canonically), item ids run over 0..n_items-1, and
    val.json and test.json hold at most one target per user.
    """
    n_users = len(user_ids)
    bad = next(
        (user for user in split if not (_USER_KEY.fullmatch(user) and int(user) < n_users)), None
    )
    if bad is not None:
        raise FedmergeError(
            f"{path}: {member} has user {bad!r}, which is not a user id of umap.json "
            f"(0..{n_users - 1}); the archive is not a consistent MergeRec split"
        )
    for user, items in split.items():
        if not isinstance(items, list) or not all(_is_int(item) for item in items):
            raise FedmergeError(
                f"{path}: {member} gives user {user} ({user_ids[int(user)]!r}) {items!r:.60}, "
                "not a list of integer item ids; the archive is not a MergeRec split"
            )
        outside = next((item for item in items if not 0 <= item < n_items), None)
        if outside is not None:
            raise FedmergeError(
                f"{path}: {member} gives user {user} item {outside}, which refers to an item "
                f"outside 0..{n_items - 1} of smap.json; the archive is not a consistent MergeRec "
                "split"
            )
        if member != "train.json" and len(items) > 1:
            raise FedmergeError(
                f"{path}: {member} gives user {user} ({user_ids[int(user)]!r}) {len(items)} "
                "targets; a MergeRec split has at most one target per user: keep one"
            )
    return cast("dict[str, list[int]]", split)  # every value checked to be a list of ints


def _targets(split: dict[str, list[int]], n_users: int) -> np.ndarray:
    """One target per user from a ``{user: [item]}`` file, -1 where absent."""
    out = np.full(n_users, NO_TARGET, dtype=np.int64)
    for user, items in split.items():
        if items:
            out[int(user)] = items[0]
    return out
