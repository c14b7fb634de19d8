"""Frozen item-text encoders and cached per-domain item-feature tables."""

from fedmerge.text.encoders import ENCODERS, HashingEncoder, MiniLMEncoder, TextEncoder, get_encoder
from fedmerge.text.features import feature_table, item_texts

__all__ = [
    "ENCODERS",
    "HashingEncoder",
    "MiniLMEncoder",
    "TextEncoder",
    "feature_table",
    "get_encoder",
    "item_texts",
]
