"""Ranking evaluation (RecBole conventions): Recall, NDCG and MRR at K.

Over all items, or over candidate lists.
"""

from fedmerge.evaluate.metrics import KS, metric_names, rank_targets, summarize, user_gains
from fedmerge.evaluate.protocol import EvalProtocol, candidate_lists
from fedmerge.evaluate.ranking import (
    Scorer,
    VariantScorer,
    domain_ranks,
    evaluate_domain,
    evaluate_variants,
    rank_embeddings,
)
from fedmerge.evaluate.scoring import calibration_variants, model_scorer

__all__ = [
    "KS",
    "EvalProtocol",
    "Scorer",
    "VariantScorer",
    "calibration_variants",
    "candidate_lists",
    "domain_ranks",
    "evaluate_domain",
    "evaluate_variants",
    "metric_names",
    "model_scorer",
    "rank_embeddings",
    "rank_targets",
    "summarize",
    "user_gains",
]
