"""Turn a recommender into a full-ranking scorer for a domain."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from fedmerge.data.domain import DomainData
from fedmerge.evaluate import Scorer, VariantScorer
from fedmerge.models import Recommender
from fedmerge.models.textseq import TextSeqRec
from fedmerge.train.batches import pad_right


def _prepared(model: Recommender, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                  Callable[[DomainData, np.ndarray, str], torch.Tensor]]:
    """`model` put in eval mode; `features` and the item vectors (computed once) on its device, and a
    function giving a batch of users' padded histories there."""
    model.eval()
    device = next(model.parameters()).device
    features = features.to(device)
    with torch.inference_mode():
        items = model.item_vectors(features)

    def histories(domain: DomainData, users: np.ndarray, split: str) -> torch.Tensor:
        return pad_right([domain.history(int(u), split) for u in users], model.config.max_len).to(device)

    return features, items, histories


def model_scorer(model: Recommender, features: torch.Tensor) -> Scorer:
    """A scorer that ranks every item by the model's score for each user's history.

    ``features`` is the domain's model input table (see :func:`fedmerge.train.run.load_parts`).
    Item vectors are computed once, on the model's device; the model is put in eval mode.
    """
    features, items, histories = _prepared(model, features)

    def score(domain: DomainData, users: np.ndarray, split: str) -> torch.Tensor:
        with torch.inference_mode():
            return model.scores(features, items, histories(domain, users, split))

    return score


def text_weight_variants(model: TextSeqRec, features: torch.Tensor, weights: list[float]) -> VariantScorer:
    """Scores of `model` with each ``text_weight`` of `weights` in turn (the scores :func:`model_scorer`
    gives with that weight set), sharing the model's pass and the text prior between them."""
    features, items, histories = _prepared(model, features)

    def variants(domain: DomainData, users: np.ndarray, split: str) -> Iterator[torch.Tensor]:
        with torch.inference_mode():
            learned, prior = model.score_terms(features, items, histories(domain, users, split))
            for weight in weights:
                yield learned + weight * prior if weight else learned

    return variants
