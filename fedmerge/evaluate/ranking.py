"""Batched ranking of a domain's users: over all of its items, or over each one's candidate list."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from fedmerge.data.domain import DomainData
from fedmerge.evaluate.metrics import KS, rank_targets, summarize
from fedmerge.evaluate.protocol import EvalProtocol, candidate_lists, sampled_users

Scorer = Callable[[DomainData, np.ndarray, str, torch.Tensor | None], torch.Tensor]
"""``scorer(domain, users, split, candidates) -> scores`` from each user's history for `split`.

The scores are of every item, (len(users), n_items), when `candidates` is None, else of each
user's candidate items only, (len(users), C) for `candidates` (len(users), C).
"""

VariantScorer = Callable[[DomainData, np.ndarray, str, torch.Tensor | None], Iterator[torch.Tensor]]
"""Like :data:`Scorer`, but yields the scores of several variants of a model in turn."""


def _mask_seen(
    scores: torch.Tensor,
    domain: DomainData,
    users: np.ndarray,
    split: str,
    targets: torch.Tensor,
    candidates: torch.Tensor | None = None,
) -> None:
    """Set the scores of each user's history items to -inf, in place, except the target itself.

    With `candidates`, `scores` are of the candidate items (one column each).
    """
    histories = [domain.history(int(u), split) for u in users]
    if candidates is not None:
        for row, seen in enumerate(histories):
            among = candidates[row]
            hide = torch.isin(among, torch.from_numpy(seen)) & (among != targets[row])
            scores[row, hide.to(scores.device)] = -torch.inf
        return
    rows = np.repeat(np.arange(len(users)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.empty(0, dtype=np.int64)
    targets = targets.to(scores.device)
    keep = scores.gather(1, targets[:, None])
    scores[
        torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)
    ] = -torch.inf
    scores.scatter_(1, targets[:, None], keep)


def evaluate_domain(
    scorer: Scorer,
    domain: DomainData,
    split: str = "test",
    batch_size: int = 1024,
    exclude_seen: bool = False,
    ks: tuple[int, ...] = KS,
    protocol: EvalProtocol | None = None,
) -> dict[str, float | int]:
    """Ranking metrics of `scorer` on `domain`'s `split` (users without a target are skipped).

    Parameters
    ----------
    scorer : Scorer
        Scores every item of the domain for a batch of users.
    domain : DomainData
        The domain (its private split, when run by a party).
    split : str
        ``valid`` (history = train) or ``test`` (history = train + valid).
    batch_size : int
        Users scored at once.
    exclude_seen : bool
        Rank only items outside the user's history (the target always stays); off by default,
        as in MergeRec.
    ks : tuple[int, ...]
        Cut-offs.
    protocol : EvalProtocol | None
        Full ranking (None, or no ``candidates``), or each target among its candidate list
        (:func:`fedmerge.evaluate.protocol.candidate_lists`); every user, or a seeded sample.

    Returns
    -------
    dict[str, float]
        ``recall@K``, ``ndcg@K``, ``mrr@K`` and ``users`` (how many were ranked).
    """
    ranks = domain_ranks(scorer, domain, split, batch_size, exclude_seen, protocol)
    return {**summarize(ranks, ks), "users": len(ranks)}


def domain_ranks(
    scorer: Scorer,
    domain: DomainData,
    split: str = "test",
    batch_size: int = 1024,
    exclude_seen: bool = False,
    protocol: EvalProtocol | None = None,
) -> torch.Tensor:
    """The 0-based rank of each ranked user's target under `scorer` (see :func:`variant_ranks`).

    The users are in the same order for every scorer, so two scorers' ranks compare user by user.
    """
    return variant_ranks(
        lambda d, u, s, c: iter([scorer(d, u, s, c)]),
        1,
        domain,
        split,
        batch_size,
        exclude_seen,
        protocol,
    )[0]


def evaluate_variants(
    variants: VariantScorer,
    n_variants: int,
    domain: DomainData,
    split: str = "test",
    batch_size: int = 1024,
    exclude_seen: bool = False,
    ks: tuple[int, ...] = KS,
    protocol: EvalProtocol | None = None,
) -> list[dict[str, float | int]]:
    """:func:`evaluate_domain` of `n_variants` scorers sharing most of their work, in one pass.

    The pass goes over the users once: `variants` yields each variant's scores of a batch in turn
    (one in memory at a time).
    """
    ranked = variant_ranks(variants, n_variants, domain, split, batch_size, exclude_seen, protocol)
    return [{**summarize(ranks, ks), "users": len(ranks)} for ranks in ranked]


def variant_ranks(
    variants: VariantScorer,
    n_variants: int,
    domain: DomainData,
    split: str = "test",
    batch_size: int = 1024,
    exclude_seen: bool = False,
    protocol: EvalProtocol | None = None,
) -> list[torch.Tensor]:
    """The 0-based rank of each ranked user's target under each variant.

    The pass of :func:`evaluate_variants`; one tensor per variant, the users in the same order in
    each.

    Two calls with the same `domain`, `split` and `protocol` rank the same users in the same
    order, so their ranks can be compared user by user.
    """
    all_targets = domain.targets(split)
    users = np.flatnonzero(all_targets >= 0)
    lists = (
        candidate_lists(domain, split, protocol)
        if protocol is not None and protocol.candidates
        else None
    )
    ranked = sampled_users(users, protocol)
    users, lists = users[ranked], None if lists is None else lists[ranked]
    # Users in order of history length: batches of similar lengths, so little padding to score.
    order = np.argsort(np.diff(domain.train_offsets)[users], kind="stable")
    ranks: list[list[torch.Tensor]] = [[] for _ in range(n_variants)]
    with torch.inference_mode():
        for start in range(0, len(users), batch_size):
            batch = users[order[start : start + batch_size]]
            targets = torch.from_numpy(all_targets[batch])
            candidates = (
                None
                if lists is None
                else torch.from_numpy(lists[order[start : start + batch_size]])
            )
            if candidates is not None:
                # the target's column in its sorted candidate list
                column = (candidates == targets[:, None]).int().argmax(1)
            for kept, scores in zip(ranks, variants(domain, batch, split, candidates), strict=True):
                if exclude_seen:
                    scores = scores.clone()
                    _mask_seen(scores, domain, batch, split, targets, candidates)
                truth = targets if candidates is None else column
                kept.append(rank_targets(scores, truth.to(scores.device)).cpu())
    return [torch.cat(kept) if kept else torch.empty(0, dtype=torch.long) for kept in ranks]


def rank_embeddings(
    user_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Ranks of `targets` when users are scored by dot product with every item vector.

    Scores are computed `batch_size` users at a time into one reused buffer.
    """
    ranks = []
    buffer = torch.empty(
        min(batch_size, user_vectors.shape[0]),
        item_vectors.shape[0],
        dtype=user_vectors.dtype,
        device=user_vectors.device,
    )
    with torch.inference_mode():
        for start in range(0, user_vectors.shape[0], batch_size):
            batch = user_vectors[start : start + batch_size]
            scores = torch.mm(batch, item_vectors.T, out=buffer[: batch.shape[0]])
            ranks.append(rank_targets(scores, targets[start : start + batch_size]))
    return torch.cat(ranks)
