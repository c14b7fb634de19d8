"""Turn a recommender into a scorer of a domain's users.

The scorer is a :data:`fedmerge.evaluate.ranking.Scorer`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fedmerge.data.domain import DomainData
from fedmerge.data.sequences import pad_right
from fedmerge.evaluate.ranking import Scorer, VariantScorer
from fedmerge.models import Recommender


def _histories(
    model: Recommender, device: torch.device, domain: DomainData, users: np.ndarray, split: str
) -> torch.Tensor:
    """A batch of users' padded histories for `split`, on `device`."""
    return pad_right([domain.history(int(u), split) for u in users], model.config.max_len).to(
        device
    )


def model_scorer(model: Recommender, table: torch.Tensor) -> Scorer:
    """A scorer that ranks every item by the model's score for each user's history.

    ``table`` is the domain's item table (:meth:`Recommender.catalogue`). The model is put in
    eval mode; whatever its scorer shares between users (item vectors) is computed once, on the
    model's device.
    """
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        score = model.scorer(table.to(device))

    def scores(domain: DomainData, users: np.ndarray, split: str) -> torch.Tensor:
        with torch.inference_mode():
            return score(_histories(model, device, domain, users, split))

    return scores


def calibration_variants(model: Recommender, table: torch.Tensor) -> VariantScorer:
    """Scores of `model` with each value of its calibration in turn, sharing their common work.

    Each value's scores are those :func:`model_scorer` gives with that value set.
    """
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        variants = model.calibration_scores(table.to(device))

    def scores(domain: DomainData, users: np.ndarray, split: str) -> Iterator[torch.Tensor]:
        with torch.inference_mode():
            yield from variants(_histories(model, device, domain, users, split))

    return scores
