"""Turn a recommender into a full-ranking scorer for a domain."""

from __future__ import annotations

import numpy as np
import torch

from fedmerge.data.domain import DomainData
from fedmerge.evaluate import Scorer
from fedmerge.models import Recommender
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
