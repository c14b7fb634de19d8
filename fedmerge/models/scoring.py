"""Turn a recommender into a full-ranking scorer for a domain."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fedmerge.data.domain import DomainData
from fedmerge.evaluate import Scorer, VariantScorer
from fedmerge.models import Recommender
from fedmerge.models.textseq import TextSeqRec
from fedmerge.train.batches import pad_right


def model_scorer(model: Recommender, features: torch.Tensor) -> Scorer:
    """A scorer that ranks every item by the model's score for each user's history.

    ``features`` is the domain's model input table (see :func:`fedmerge.train.run.load_parts`).
    Item vectors are computed once, on the model's device; the model is put in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    features = features.to(device)
    with torch.inference_mode():
        items = model.item_vectors(features)

    def score(domain: DomainData, users: np.ndarray, split: str) -> torch.Tensor:
        histories = pad_right([domain.history(int(u), split) for u in users], model.config.max_len).to(device)
        with torch.inference_mode():
            return model.scores(features, items, histories)

    return score


def text_weight_variants(model: TextSeqRec, features: torch.Tensor, weights: list[float]) -> VariantScorer:
    """Scores of `model` with each ``text_weight`` of `weights` in turn (the scores :func:`model_scorer`
    gives with that weight set), sharing the model's pass and the text prior between them."""
    model.eval()
    device = next(model.parameters()).device
    features = features.to(device)
    with torch.inference_mode():
        items = model.item_vectors(features)

    def variants(domain: DomainData, users: np.ndarray, split: str) -> Iterator[torch.Tensor]:
        histories = pad_right([domain.history(int(u), split) for u in users], model.config.max_len).to(device)
        with torch.inference_mode():
            learned, prior = model.score_terms(features, items, histories)
            for weight in weights:
                yield learned + weight * prior if weight else learned

    return variants
