"""Turn a recommender into a full-ranking scorer for a domain."""

from __future__ import annotations

import numpy as np
import torch

from fedmerge.data.domain import DomainData
from fedmerge.evaluate import Scorer
from fedmerge.models.textseq import TextSeqRec
from fedmerge.train.batches import pad_right


def model_scorer(model: TextSeqRec, features: torch.Tensor) -> Scorer:
    """A scorer that ranks by cosine between each user's vector and every item vector.

    Item vectors are computed once; the model is put in eval mode.
    """
    model.eval()
    with torch.inference_mode():
        items = model.item_vectors(features)

    def score(domain: DomainData, users: np.ndarray, split: str) -> torch.Tensor:
        histories = pad_right([domain.history(int(u), split) for u in users], model.config.max_len)
        with torch.inference_mode():
            return model.user_vectors(items, histories) @ items.T

    return score
