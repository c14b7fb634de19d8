"""Full-ranking evaluation (RecBole conventions): Recall, NDCG, MRR at K over all items."""

from fedmerge.evaluate.metrics import KS, metric_names, rank_targets, summarize
from fedmerge.evaluate.ranking import Scorer, VariantScorer, evaluate_domain, evaluate_variants, rank_embeddings
from fedmerge.evaluate.scoring import calibration_variants, model_scorer

__all__ = ["KS", "Scorer", "VariantScorer", "calibration_variants", "evaluate_domain", "evaluate_variants",
           "metric_names", "model_scorer", "rank_embeddings", "rank_targets", "summarize"]
