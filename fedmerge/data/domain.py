"""DomainData: one domain's items (with text) and user sequences, split leave-one-out.

Items are indexed 0..n_items-1 and users 0..n_users-1; the original identifiers are kept
in `item_ids` / `user_ids`. Each user's interactions are split into a training sequence
(time order, oldest first), one validation target and one test target (RecBole's
leave-one-out: valid = second-to-last item, test = last). A user may lack a validation or
test target (marked -1): such a user is skipped when that split is evaluated.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedmerge.errors import FedmergeError
from fedmerge.files import swap_folder

TEXT_FIELDS: tuple[str, ...] = ("title", "brand", "category")
NO_TARGET = -1
_FORMAT_VERSION = 1
_ARRAYS = ("train_offsets", "train_items", "valid", "test")


class CorruptCacheError(FedmergeError):
    """A cached domain file that cannot be read back; `path` names the file."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = Path(path)
        super().__init__(
            f"the cached domain file {path} is corrupt ({detail}); delete {self.path.parent} and "
            "load it again"
        )


def cache_write_error(path: Path, err: OSError) -> FedmergeError:
    """The error for a failed cache write of `path`.

    A full disk says to free space or move the cache.
    """
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return FedmergeError(
            f"cannot write {path}: the disk is full ({err.strerror}); nothing was kept: free disk "
            "space or set FEDMERGE_DATA to a folder on a disk with room"
        )
    return FedmergeError(
        f"cannot write {path} ({err.strerror or err}); nothing was kept: check the folder's "
        "permissions or set FEDMERGE_DATA to a writable folder"
    )


@dataclass(frozen=True)
class DomainData:
    """A domain's catalogue and its users' sequences, split leave-one-out.

    Attributes
    ----------
    name : str
        Domain name (registry name, import name or ``synth-N``).
    item_ids : list[str]
        Original item identifier of each item index.
    item_text : dict[str, list[str]]
        Text fields (``title``, ``brand``, ``category``; absent fields omitted), one string
        per item, possibly empty.
    user_ids : list[str]
        Original user identifier of each user index.
    train_offsets : np.ndarray
        int64, shape (n_users + 1,): user u's training items are
        ``train_items[train_offsets[u]:train_offsets[u + 1]]``.
    train_items : np.ndarray
        int64 item indices of all training sequences, concatenated, each oldest first.
    valid : np.ndarray
        int64, shape (n_users,): validation target per user, or -1.
    test : np.ndarray
        int64, shape (n_users,): test target per user, or -1.
    """

    name: str
    item_ids: list[str]
    item_text: dict[str, list[str]]
    user_ids: list[str]
    train_offsets: np.ndarray
    train_items: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check that splits, training offsets, text fields and item ids are consistent."""
        n_users, n_items = len(self.user_ids), len(self.item_ids)
        if (
            len(self.train_offsets) != n_users + 1
            or len(self.valid) != n_users
            or len(self.test) != n_users
        ):
            raise FedmergeError(f"domain {self.name!r}: split arrays do not match {n_users} users")
        offsets = self.train_offsets
        if offsets[0] != 0 or offsets[-1] != len(self.train_items) or (np.diff(offsets) < 0).any():
            raise FedmergeError(
                f"domain {self.name!r}: train_offsets do not delimit the {len(self.train_items)} "
                "training items"
            )
        for key, values in self.item_text.items():
            if len(values) != n_items:
                raise FedmergeError(
                    f"domain {self.name!r}: text field {key!r} has {len(values)} values for "
                    f"{n_items} items"
                )
        used = np.concatenate(
            [self.train_items, self.valid[self.valid >= 0], self.test[self.test >= 0]]
        )
        if used.size and (used.min() < 0 or used.max() >= n_items):
            raise FedmergeError(
                f"domain {self.name!r}: an interaction refers to an item outside 0..{n_items - 1}"
            )

    @property
    def n_users(self) -> int:
        """Number of users."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of items in the catalogue."""
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        """Interactions over all splits (train + valid + test)."""
        return int(self.train_items.size + (self.valid >= 0).sum() + (self.test >= 0).sum())

    def train_sequence(self, user: int) -> np.ndarray:
        """User `user`'s training items, oldest first."""
        return self.train_items[self.train_offsets[user] : self.train_offsets[user + 1]]

    def history(self, user: int, split: str) -> np.ndarray:
        """The items a model sees before predicting `split`'s target (train, + valid for test)."""
        train = self.train_sequence(user)
        if split == "valid":
            return train
        if split == "test":
            return train if self.valid[user] < 0 else np.append(train, self.valid[user])
        raise FedmergeError(f"unknown split {split!r}; use 'valid' or 'test'")

    def targets(self, split: str) -> np.ndarray:
        """Target item per user for `split` (``valid`` or ``test``), -1 where absent."""
        if split not in ("valid", "test"):
            raise FedmergeError(f"unknown split {split!r}; use 'valid' or 'test'")
        return self.valid if split == "valid" else self.test

    def item_counts(self) -> np.ndarray:
        """How often each item occurs in the training sequences (popularity)."""
        return np.bincount(self.train_items, minlength=self.n_items)

    def summary(self) -> dict[str, object]:
        """Counts of the whole data set (all splits), for ``fedmerge data info``."""
        lengths = np.diff(self.train_offsets) + (self.valid >= 0) + (self.test >= 0)
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "train_interactions": int(self.train_items.size),
            "valid_users": int((self.valid >= 0).sum()),
            "test_users": int((self.test >= 0).sum()),
            "avg_sequence_length": round(float(lengths.mean()), 3) if self.n_users else 0.0,
            "text_fields": sorted(self.item_text),
            "density": round(self.n_interactions / max(1, self.n_users * self.n_items), 6),
        }

    def save(self, directory: Path) -> None:
        """Write the domain to `directory` atomically.

        It is built in a temporary sibling, then swapped in.

        A folder already at `directory` is replaced only once the new one is complete; a failed
        write (full disk: a FedmergeError naming the file) leaves it as it was. When another
        process finishes writing the same folder first, its copy is kept.
        """
        directory = Path(directory)
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        except OSError as err:
            raise cache_write_error(directory, err) from err
        try:
            try:
                np.savez(tmp / "arrays.npz", **{key: getattr(self, key) for key in _ARRAYS})
            except OSError as err:
                raise cache_write_error(directory / "arrays.npz", err) from err
            meta = {
                "format_version": _FORMAT_VERSION,
                "name": self.name,
                "source": self.source,
                "item_ids": self.item_ids,
                "item_text": self.item_text,
                "user_ids": self.user_ids,
            }
            try:
                (tmp / "domain.json").write_text(json.dumps(meta))
            except OSError as err:
                raise cache_write_error(directory / "domain.json", err) from err
            _swap_in(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> DomainData:
        """Read a domain written by :meth:`save`."""
        directory = Path(directory)
        meta_path, arrays_path = directory / "domain.json", directory / "arrays.npz"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise CorruptCacheError(meta_path, str(err)) from err
        if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
            raise CorruptCacheError(meta_path, f"not format version {_FORMAT_VERSION}")
        try:
            with np.load(arrays_path, allow_pickle=False) as arrays:
                parts = {key: arrays[key] for key in _ARRAYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise CorruptCacheError(arrays_path, str(err) or type(err).__name__) from err
        if any(array.ndim != 1 or array.dtype.kind not in "iu" for array in parts.values()):
            raise CorruptCacheError(arrays_path, "an array is not a vector of integers")
        try:
            return cls(
                name=meta["name"],
                item_ids=meta["item_ids"],
                item_text=meta["item_text"],
                user_ids=meta["user_ids"],
                source=meta.get("source", {}),
                **parts,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptCacheError(meta_path, f"{type(err).__name__}: {err}") from err
        except FedmergeError as err:  # DomainData's consistency checks
            raise CorruptCacheError(arrays_path, f"does not match {meta_path.name}: {err}") from err


def _swap_in(tmp: Path, directory: Path) -> None:
    """Rename the complete folder `tmp` to `directory` (:func:`fedmerge.files.swap_folder`).

    A concurrent writer's complete copy is kept; any other failure is a cache write error.
    """
    try:
        swap_folder(tmp, directory, complete=lambda folder: (folder / "domain.json").exists())
    except OSError as err:
        raise cache_write_error(directory, err) from err


def check_not_empty(domain: DomainData, where: str) -> None:
    """Refuse a domain without users or interactions: it cannot be trained or evaluated.

    Parameters
    ----------
    domain : DomainData
        The imported domain.
    where : str
        The file it came from, for the message.
    """
    if domain.n_users == 0 or domain.n_interactions == 0:
        raise FedmergeError(
            f"{where} holds no interactions ({domain.n_users} users, {domain.n_interactions} "
            "interactions), so it cannot be a domain; give a file with at least one user's items"
        )


def from_sequences(
    name: str,
    item_ids: Sequence[str],
    item_text: dict[str, list[str]],
    user_ids: Sequence[str],
    sequences: Sequence[Sequence[int]],
    source: dict[str, str] | None = None,
) -> DomainData:
    """Split full time-ordered sequences leave-one-out (RecBole's convention).

    A user with n >= 3 items gets n - 2 training items, a validation and a test target; with
    n = 2, one training item and a test target; with n = 1, one training item only. A user
    without items, or a domain without users, is an error naming ``source["path"]`` (or `name`).
    """
    where = (source or {}).get("path", f"domain {name!r}")
    empty = next(
        (user for user, seq in zip(user_ids, sequences, strict=True) if len(seq) == 0), None
    )
    if empty is not None:
        raise FedmergeError(
            f"{where}: user {empty!r} has no interactions; drop that user or give it its items"
        )
    offsets = [0]
    train: list[int] = []
    valid = np.full(len(sequences), NO_TARGET, dtype=np.int64)
    test = np.full(len(sequences), NO_TARGET, dtype=np.int64)
    for user, seq in enumerate(sequences):
        n_held = 2 if len(seq) >= 3 else len(seq) - 1
        train.extend(seq[: len(seq) - n_held])
        if n_held >= 1:
            test[user] = seq[-1]
        if n_held == 2:
            valid[user] = seq[-2]
        offsets.append(len(train))
    domain = DomainData(
        name=name,
        item_ids=list(item_ids),
        item_text=item_text,
        user_ids=list(user_ids),
        train_offsets=np.asarray(offsets, dtype=np.int64),
        train_items=np.asarray(train, dtype=np.int64),
        valid=valid,
        test=test,
        source=dict(source or {}),
    )
    check_not_empty(domain, where)
    return domain


def full_sequences(domain: DomainData) -> list[np.ndarray]:
    """Each user's whole sequence (train, then valid and test targets where present)."""
    return [
        np.append(domain.history(user, "test"), domain.test[user])
        if domain.test[user] >= 0
        else domain.history(user, "test")
        for user in range(domain.n_users)
    ]


def user_subset(domain: DomainData, users: np.ndarray) -> DomainData:
    """The same catalogue with only `users` (indices, kept in the given order) and their splits."""
    users = np.asarray(users, dtype=np.int64)
    starts, ends = domain.train_offsets[users], domain.train_offsets[users + 1]
    items = [domain.train_items[s:e] for s, e in zip(starts, ends, strict=True)]
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    return replace(
        domain,
        user_ids=[domain.user_ids[u] for u in users],
        train_offsets=offsets,
        train_items=np.concatenate(items) if items else np.empty(0, dtype=np.int64),
        valid=domain.valid[users],
        test=domain.test[users],
    )
