"""Rank of the target among all items, and the metrics computed from it.

Ranks are 0-based: the number of items scored strictly higher than the target, plus the
items scored exactly as high that come before it in item order (ties are broken by item
index, as a stable sort would; a constant model therefore gets no credit for ties).
With one target per user, recall@K equals the hit rate; ndcg@K = 1 / log2(rank + 2) and
mrr@K = 1 / (rank + 1) when rank < K, else 0.
"""

from __future__ import annotations

import torch

from fedmerge.errors import FedmergeError

KS: tuple[int, ...] = (1, 5, 10, 20, 50)
_BLOCK_ELEMENTS = 1 << 20


def metric_names(ks: tuple[int, ...] = KS) -> list[str]:
    """Column names in table order: recall@K, ndcg@K, mrr@K for every K."""
    return [f"{metric}@{k}" for metric in ("recall", "ndcg", "mrr") for k in ks]


def rank_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target item among all items of that row.

    Rows are processed in blocks of about a million scores so that the comparison masks stay
    in cache (a full-size boolean mask costs more than the matrix product that made the scores).

    Parameters
    ----------
    scores : torch.Tensor
        (B, N) scores of every item for each of B users; higher is better.
    targets : torch.Tensor
        (B,) int64 target item per user.

    Returns
    -------
    torch.Tensor
        (B,) int64 ranks.
    """
    rows = max(1, _BLOCK_ELEMENTS // max(1, scores.shape[1]))
    return torch.cat(
        [
            _rank_block(scores[start : start + rows], targets[start : start + rows])
            for start in range(0, scores.shape[0], rows)
        ]
    )


def _rank_block(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`rank_targets` on one block of rows."""
    if torch.isnan(scores).any():
        raise FedmergeError(
            "the model produced NaN scores; its weights or inputs are broken (check for NaN "
            "weights)"
        )
    target_scores = scores.gather(1, targets[:, None])
    ranks = (scores > target_scores).sum(1)
    ties = scores == target_scores
    tied_rows = (ties.sum(1) > 1).nonzero().squeeze(1)
    if tied_rows.numel():
        before = (
            torch.arange(scores.shape[1], device=scores.device)[None, :] < targets[tied_rows, None]
        )
        ranks[tied_rows] += (ties[tied_rows] & before).sum(1)
    return ranks


def user_gains(ranks: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Each user's recall@k, ndcg@k and mrr@k (float64), from its target's 0-based rank."""
    ranks = ranks.double()
    inside = (ranks < k).double()
    return {
        f"recall@{k}": inside,
        f"ndcg@{k}": inside / torch.log2(ranks + 2.0),
        f"mrr@{k}": inside / (ranks + 1.0),
    }


def summarize(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Mean recall@K, ndcg@K and mrr@K over users, from their targets' ranks."""
    if ranks.numel() == 0:
        raise FedmergeError("no user has a target in this split, so there is nothing to evaluate")
    gains = {name: g for k in ks for name, g in user_gains(ranks, k).items()}
    return {
        f"{metric}@{k}": float(gains[f"{metric}@{k}"].mean())
        for metric in ("recall", "ndcg", "mrr")
        for k in ks
    }
