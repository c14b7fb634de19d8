"""Pseudo-users (MergeRec): virtual histories built from a domain's public catalogue only.

Every item i (or a subset) becomes a virtual user with history ``[i]`` whose "own item" is i.
Subsets: a seeded random sample, or the items nearest to k-means centroids of the item
features. Beyond the paper, ``walk_length > 1`` extends each history by walking the teacher's
item-item scores (each next item drawn from the current item's top neighbours), giving
multi-item pseudo-sequences; the own item is then the walk's last item. A family that ranks
candidate lists only (``learn.candidates``) walks on candidate lists instead: each step scores a
seeded random pool of items given the walk so far (:func:`candidate_walk_users`). With
``mixed_lengths`` each walk is cut after a seeded random number of items (1 to ``walk_length``),
so one set of pseudo-users covers short and long histories alike.

Also beyond the paper, ``target = "next"`` makes the own item the walk's next step after the
history (one of the teacher's top neighbours of the history's last item) instead of the
history's last item: the pseudo-user then asks for what follows, as a real user's target does,
and the loss leaves the history's last item out (:func:`fedmerge.merge.learn.learn_coefficients`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from fedmerge.config import ConfigModel
from fedmerge.errors import FedmergeError

Selection = Literal["all", "random", "kmeans"]


class PseudoConfig(ConfigModel):
    """How the server builds pseudo-users for each domain."""

    selection: Selection = Field(
        "all",
        description="which items start pseudo-users: all (MergeRec), random or "
        "kmeans (count per domain)",
    )
    count: int = Field(
        1000, ge=1, description="random / kmeans: pseudo-users per domain (capped at the catalogue)"
    )
    walk_length: int = Field(
        1, ge=1, description="items per pseudo-history (1 = the paper's one-item users)"
    )
    walk_top: int = Field(
        10,
        ge=1,
        description="walks step to one of the current item's top teacher neighbours (with "
        "learn.candidates: of the teacher's best in a random pool of that many items)",
    )
    mixed_lengths: bool = Field(
        False, description="cut each walk after a random 1..walk_length items"
    )
    target: Literal["last", "next"] = Field(
        "last",
        description="each pseudo-user's own item: the history's last item (MergeRec) or the walk's "
        "next step after the history, which the loss then scores without the history's last item",
    )
    seed: int = Field(0, description="seed of the selection and the walks")


@dataclass
class PseudoUsers:
    """Pseudo-users of a domain: right-padded histories (P, L), pad -1, and each one's item (P,).

    With candidate lists (``learn.candidates``), ``candidates`` (P, C + 1) holds each one's own
    item first, then C other items of the catalogue.
    """

    histories: torch.Tensor
    items: torch.Tensor
    candidates: torch.Tensor | None = None


def check_candidates(count: int, n_items: int) -> None:
    """Refuse `count` candidates besides the own item from a catalogue of `n_items`."""
    if count > n_items - 1:
        raise FedmergeError(
            f"learn.candidates = {count} but a catalogue has only {n_items} items; lower "
            "learn.candidates below the smallest catalogue"
        )


def with_candidates(users: PseudoUsers, n_items: int, count: int, seed: int) -> PseudoUsers:
    """`users` with a candidate list each: the own item, then `count` other items (uniform).

    Raises
    ------
    FedmergeError
        When the catalogue has fewer than `count` other items.
    """
    check_candidates(count, n_items)
    generator = torch.Generator().manual_seed(seed)
    # `count` distinct draws from the n - 1 other items: shift past the own item
    drawn = torch.rand(len(users.items), n_items - 1, generator=generator).argsort(1)[:, :count]
    others = drawn + (drawn >= users.items[:, None]).long()
    return PseudoUsers(users.histories, users.items, torch.cat([users.items[:, None], others], 1))


def select_items(features: torch.Tensor, config: PseudoConfig) -> torch.Tensor:
    """The items that start pseudo-users.

    All of them, a random subset, or those nearest k-means centroids.
    """
    n = len(features)
    if config.selection == "all" or config.count >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(config.seed)
    if config.selection == "random":
        return torch.randperm(n, generator=generator)[: config.count].sort().values
    return _kmeans_items(features.float(), config.count, generator)


def _kmeans_items(
    features: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 20
) -> torch.Tensor:
    """Items nearest to the centroids of a seeded k-means (Lloyd) on the features.

    One item per centroid, all distinct.
    """
    centroids = features[torch.randperm(len(features), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(features, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, features)
        counts = torch.bincount(assign, minlength=k)[:, None]
        # an empty cluster keeps its centroid
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    distances = torch.cdist(centroids, features)
    chosen: list[int] = []
    taken = torch.zeros(len(features), dtype=torch.bool)
    for c in range(k):
        row = distances[c].masked_fill(taken, float("inf"))
        item = int(row.argmin())
        chosen.append(item)
        taken[item] = True
    return torch.tensor(sorted(chosen))


def one_item_users(items: torch.Tensor) -> PseudoUsers:
    """History ``[i]`` for each item i."""
    return PseudoUsers(items[:, None].clone(), items.clone())


def walk_users(
    starts: torch.Tensor,
    neighbours: torch.Tensor,
    length: int,
    seed: int,
    mixed: bool = False,
    next_item: bool = False,
) -> PseudoUsers:
    """Histories of `length` items.

    From each start, step to a random one of the current item's `neighbours`.

    ``neighbours`` is (n_items, top) item indices (the teacher's best-scored items for ``[i]``,
    the item itself excluded). ``mixed`` keeps a seeded random 1..`length` first items of each
    walk (right-padded with -1); the own item is the last one kept, or with ``next_item`` the
    walk's step after it.
    """
    generator = torch.Generator().manual_seed(seed)
    walks = [starts]
    for _ in range(length - 1 + int(next_item)):
        pick = torch.randint(neighbours.shape[1], (len(starts),), generator=generator)
        walks.append(neighbours[walks[-1], pick])
    return _cut(torch.stack(walks, 1), length, generator, mixed, next_item)


def candidate_walk_users(
    starts: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_items: int,
    length: int,
    top: int,
    pool: int,
    seed: int,
    mixed: bool = False,
) -> PseudoUsers:
    """Histories of `length` items for a family that ranks candidate lists only.

    Each step draws `pool` other items than the current one (uniform, seeded), scores them with
    ``score(walks so far, pool)`` (the teacher, which reads the whole walk as a history) and steps
    to a random one of the best `top`. ``mixed`` and the own item are as in :func:`walk_users`.
    """
    generator = torch.Generator().manual_seed(seed)
    walks = starts[:, None]
    rows = torch.arange(len(starts))
    for _ in range(length - 1):
        drawn = torch.rand(len(starts), n_items - 1, generator=generator).argsort(1)[:, :pool]
        others = drawn + (drawn >= walks[:, -1:]).long()
        best = score(walks, others).float().cpu().topk(min(top, pool), dim=1).indices
        pick = torch.randint(best.shape[1], (len(starts),), generator=generator)
        walks = torch.cat([walks, others[rows, best[rows, pick]][:, None]], 1)
    return _cut(walks, length, generator, mixed, False)


def _cut(
    walks: torch.Tensor, length: int, generator: torch.Generator, mixed: bool, next_item: bool
) -> PseudoUsers:
    """Pseudo-users from whole walks (P, length [+ 1]): each kept prefix and its own item."""
    count = len(walks)
    kept = (
        torch.randint(1, length + 1, (count,), generator=generator)
        if mixed
        else torch.full((count,), length)
    )
    own = walks[torch.arange(count), kept - 1 + int(next_item)].clone()
    return PseudoUsers(
        walks[:, :length].masked_fill(torch.arange(length) >= kept[:, None], -1), own
    )
