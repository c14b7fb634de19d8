"""Recommenders; every model of one kind shares its parameter layout across domains."""

from fedmerge.models.textenc import TextEncRec
from fedmerge.models.textseq import TextSeqRec

Recommender = TextSeqRec | TextEncRec
MODELS: dict[str, type[Recommender]] = {"textseq": TextSeqRec, "textenc": TextEncRec}

__all__ = ["MODELS", "Recommender", "TextEncRec", "TextSeqRec"]
