"""The evaluation protocol: rank every item of the domain, or a candidate list per user.

With candidate lists each user's target is ranked among ``candidates`` negatives drawn from
the domain's other items (uniformly, or by training-split popularity) with a seeded generator.
A list is sorted by item id, so ties are broken by item index as in full ranking. The lists
are built once per domain split and kept in the cache (``$FEDMERGE_DATA/candidates/``), keyed
by the split's targets, so every model and every run of the same data is ranked on the same
lists. They hold a party's private targets and never leave it.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
from pydantic import Field

from fedmerge.config import ConfigModel
from fedmerge.data.domain import DomainData
from fedmerge.data.download import cache_dir
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path


class EvalProtocol(ConfigModel):
    """How models are ranked: over every item of the domain, or over a candidate list per user."""

    candidates: int | None = Field(
        None,
        ge=1,
        description="negatives ranked with each user's target (None: full "
        "ranking over every item of the domain)",
    )
    sampler: Literal["uniform", "popularity"] = Field(
        "uniform",
        description="how the negatives are drawn: uniformly "
        "or by training-split popularity, never the target",
    )
    seed: int = Field(0, description="seed of the candidate lists and of the user sample")
    users: int | None = Field(
        None,
        ge=1,
        description="rank a seeded sample of this many users of each split (None: every user); "
        "for models too slow to rank every user, such as a language model on a CPU",
    )

    def name(self) -> str:
        """How the protocol is written in every metrics row."""
        ranked = (
            "full"
            if self.candidates is None
            else f"{self.candidates} {self.sampler} negatives, seed {self.seed}"
        )
        return ranked if self.users is None else f"{ranked}, {self.users} users sampled"


def sampled_users(users: np.ndarray, protocol: EvalProtocol | None) -> np.ndarray:
    """Positions in `users` that are ranked: all, or ``protocol.users`` of them (seeded, sorted)."""
    if protocol is None or protocol.users is None or protocol.users >= len(users):
        return np.arange(len(users))
    rng = np.random.default_rng(protocol.seed)
    return np.sort(rng.choice(len(users), protocol.users, replace=False))


def candidate_lists(domain: DomainData, split: str, protocol: EvalProtocol) -> np.ndarray:
    """(users with a target, candidates + 1) sorted item ids.

    Each row holds such a user's target and its negatives.

    Read from the cache when this split (its targets) had its lists drawn before with the same
    protocol; else drawn and written there.
    """
    assert protocol.candidates is not None
    if protocol.candidates > domain.n_items - 1:
        raise FedmergeError(
            f"domain {domain.name!r} has {domain.n_items} items, so a candidate list holds at most "
            f"{domain.n_items - 1} negatives, not {protocol.candidates}; lower "
            "train.evaluation.candidates"
        )
    targets = domain.targets(split)
    users = np.flatnonzero(targets >= 0)
    n = protocol.candidates
    key = hashlib.sha256(targets.tobytes() + np.int64(domain.n_items).tobytes()).hexdigest()[:16]
    path = (
        cache_dir() / "candidates" / f"{split}-{protocol.sampler}-{n}-seed{protocol.seed}-{key}.npy"
    )
    if path.is_file():
        lists = np.load(path, allow_pickle=False)
        if lists.shape == (len(users), n + 1):
            return lists
    lists = _draw(
        targets[users],
        domain.n_items,
        n,
        _weights(domain, protocol.sampler),
        np.random.default_rng(protocol.seed),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, lists, allow_pickle=False)
    return lists


def _weights(domain: DomainData, sampler: str) -> np.ndarray | None:
    """Sampling weights of the items: None (uniform) or training-split counts plus one.

    So every item can be drawn.
    """
    return None if sampler == "uniform" else domain.item_counts().astype(np.float64) + 1.0


def _draw(
    targets: np.ndarray, n_items: int, n: int, weights: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Each target with `n` distinct other items drawn by `weights`, sorted by item id.

    `weights` None draws uniformly.
    """
    cdf = None if weights is None else np.cumsum(weights / weights.sum())
    out = np.empty((len(targets), n + 1), dtype=np.int64)
    for row, target in enumerate(targets):
        chosen: set[int] = set()
        while len(chosen) < n:
            draws = (
                rng.integers(0, n_items, 2 * n)
                if cdf is None
                else np.minimum(np.searchsorted(cdf, rng.random(2 * n)), n_items - 1)
            )
            for item in draws.tolist():
                if item != target and len(chosen) < n:
                    chosen.add(item)
        out[row] = np.sort(np.fromiter((*chosen, int(target)), dtype=np.int64, count=n + 1))
    return out
