"""Popularity baseline: every user gets the domain's most frequent training items."""

from __future__ import annotations

import numpy as np
import torch

from fedmerge.data.domain import DomainData


def popularity_scorer(
    domain: DomainData, users: np.ndarray, split: str, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores = training-split counts of each item, the same for every user (a :data:`Scorer`).

    With `candidates`, the counts of each user's candidate items.
    """
    counts = torch.from_numpy(domain.item_counts()).float()
    return counts.expand(len(users), -1) if candidates is None else counts[candidates]
