"""Turn a recommender into a scorer of a domain's users.

The scorer is a :data:`fedmerge.evaluate.ranking.Scorer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
    """A scorer that ranks items by the model's score for each user's history.

    ``table`` is the domain's item table (:meth:`Recommender.catalogue`). The model is put in
    eval mode; whatever its scorer shares between users (item vectors) is computed once, on the
    model's device, when first needed: the scores of every item, or of each user's candidates.
    """
    model.eval()
    device = next(model.parameters()).device
    table = table.to(device)
    made: dict[bool, Callable[..., torch.Tensor]] = {}

    def scores(
        domain: DomainData, users: np.ndarray, split: str, candidates: torch.Tensor | None
    ) -> torch.Tensor:
        with torch.inference_mode():
            lists = candidates is not None
            if lists not in made:
                made[lists] = model.candidate_scorer(table) if lists else model.scorer(table)
            histories = _histories(model, device, domain, users, split)
            if candidates is None:
                return made[lists](histories)
            return made[lists](histories, candidates.to(device))

    return scores


def calibration_variants(model: Recommender, table: torch.Tensor) -> VariantScorer:
    """Scores of `model` with each value of its calibration in turn, sharing their common work.

    Each value's scores are those :func:`model_scorer` gives with that value set (read at the
    candidates when there are candidate lists).
    """
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        variants = model.calibration_scores(table.to(device))

    def scores(
        domain: DomainData, users: np.ndarray, split: str, candidates: torch.Tensor | None
    ) -> Iterator[torch.Tensor]:
        with torch.inference_mode():
            for scored in variants(_histories(model, device, domain, users, split)):
                yield scored if candidates is None else scored.gather(1, candidates.to(device))

    return scores
