"""Text-encoder recommender (BLaIR-style): the sentence encoder itself is fine-tuned.

An item's vector is the encoding of its text; a user's vector is the encoding of the texts of
the history's items, most recent first, ``[CLS] t_n [SEP] t_n-1 [SEP] ...`` cut at
``history_tokens``. Both are mean-pooled over tokens and L2-normalised; scores are cosines
(divided by the temperature in the loss). Training uses an in-batch softmax: each training
sequence's last item is its target, the other targets of the batch are the negatives.

The encoder starts from all-MiniLM-L6-v2 (``pretrained = true``), or is a seeded BERT of the
config's ``dim``, ``layers`` and ``heads`` with the same tokenizer (tiny configs for tests).
Its parameters depend only on the config, never on the domain, so task vectors align.
A GPU is the intended home; on CPU the pretrained encoder trains slowly.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.nn import functional as F

from fedmerge.data.domain import DomainData
from fedmerge.data.sequences import last_items
from fedmerge.models.family import FamilyConfig, check_heads, register
from fedmerge.models.twotower import TwoTower
from fedmerge.text.tokens import load_tokenizer, minilm_folder, token_table

ENCODE_BATCH = 256
BERT_POSITIONS = 512  # position embeddings of the pretrained all-MiniLM-L6-v2


class TextEncConfig(FamilyConfig):
    """The ``textenc`` family: a fine-tuned encoder, all-MiniLM-L6-v2 or a seeded small BERT."""

    kind: Literal["textenc"] = Field("textenc", description="the model family")
    pretrained: bool = Field(
        True, description="start from all-MiniLM-L6-v2 (else a seeded dim/layers/heads BERT)"
    )
    dim: int = Field(128, ge=8, description="hidden size (only when not pretrained)")
    layers: int = Field(2, ge=0, description="transformer layers (only when not pretrained)")
    heads: int = Field(
        2,
        ge=1,
        description="attention heads (only when not pretrained); dim must be a multiple of it",
    )
    temperature: float = Field(
        0.05, gt=0.0, le=10.0, description="softmax temperature on cosine scores"
    )
    item_tokens: int = Field(32, ge=1, description="tokens kept of each item's text")
    history_tokens: int = Field(256, ge=8, description="tokens kept of a user's history text")

    @model_validator(mode="after")
    def _buildable(self) -> TextEncConfig:
        """A seeded BERT splits dim across heads; the pretrained one has 512 positions."""
        if not self.pretrained:
            check_heads(self.dim, self.heads)
        if self.pretrained:
            for key, tokens in (
                ("history_tokens", self.history_tokens),
                ("item_tokens", self.item_tokens + 2),
            ):
                if tokens > BERT_POSITIONS:
                    raise ValueError(
                        f"model.{key} = {getattr(self, key)} does not fit the {BERT_POSITIONS} "
                        "positions of the pretrained encoder (an item's text also takes [CLS] and "
                        "[SEP]); lower it"
                    )
        return self


@register
class TextEncRec(TwoTower[TextEncConfig]):
    """The text-encoder recommender (see the module docstring).

    ``features`` everywhere is the domain's (n_items, item_tokens) token table
    (:func:`fedmerge.text.tokens.token_table`).
    """

    kind = "textenc"
    Config = TextEncConfig
    block_pattern = re.compile(r"encoder\.layer\.(\d+)\.")
    config: TextEncConfig

    def __init__(self, config: TextEncConfig, text_dim: int) -> None:
        from transformers import BertConfig, BertModel

        super().__init__(config, text_dim)
        if text_dim != config.item_tokens:
            raise ValueError(
                f"token table width {text_dim} != model.item_tokens {config.item_tokens}"
            )
        self.text_dim = text_dim
        tokenizer = load_tokenizer()
        self.cls, self.sep, self.pad = (
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer.pad_token_id,
        )
        if config.pretrained:
            self.encoder = BertModel.from_pretrained(
                minilm_folder(), local_files_only=True, add_pooling_layer=False
            )
        else:
            self.encoder = BertModel(
                BertConfig(
                    vocab_size=tokenizer.vocab_size,
                    hidden_size=config.dim,
                    num_hidden_layers=config.layers,
                    num_attention_heads=config.heads,
                    intermediate_size=2 * config.dim,
                    pad_token_id=self.pad,
                    max_position_embeddings=max(config.history_tokens, config.item_tokens + 2),
                ),
                add_pooling_layer=False,
            )

    @classmethod
    def catalogue(
        cls, domain: DomainData, config: TextEncConfig, quiet: bool = True
    ) -> torch.Tensor:
        """The (n_items, item_tokens) token table of the items' text (pad-padded)."""
        return torch.from_numpy(token_table(domain, config.item_tokens))

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) pad-padded token ids -> (B, hidden) unit vectors, mean-pooled over real tokens."""
        ids = ids.to(self.encoder.device)
        mask = (ids != self.pad).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0), dim=-1)

    def item_ids(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[CLS] text [SEP]`` token ids of `items` (on the CPU)."""
        rows = features.cpu()[items.cpu()]
        lengths = (rows != self.pad).sum(1)
        out = torch.full((len(items), rows.shape[1] + 2), self.pad, dtype=torch.long)
        out[:, 0] = self.cls
        out[:, 1:-1] = rows
        out[torch.arange(len(items)), lengths + 1] = self.sep
        return out[:, : int(lengths.max()) + 2]

    def history_ids(self, features: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        """Token ids (on the CPU) of right-padded histories (B, L), pad = -1.

        The most recent item's text comes first.
        """
        features, rows = features.cpu(), []
        for history in histories.cpu():
            tokens = [self.cls]
            for item in reversed(history[history >= 0][-self.config.max_len :].tolist()):
                text = features[item]
                tokens += text[text != self.pad].tolist() + [self.sep]
                if len(tokens) >= self.config.history_tokens:
                    break
            rows.append(tokens[: self.config.history_tokens])
        out = torch.full((len(rows), max(map(len, rows))), self.pad, dtype=torch.long)
        for row, tokens in enumerate(rows):
            out[row, : len(tokens)] = torch.tensor(tokens)
        return out

    def item_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """(N, hidden) unit vectors of every item, encoded in batches."""
        items = torch.arange(len(features))
        return torch.cat(
            [
                self.encode(self.item_ids(features, items[start : start + ENCODE_BATCH]))
                for start in range(0, len(items), ENCODE_BATCH)
            ]
        )

    def scores(
        self,
        features: torch.Tensor,
        items: torch.Tensor,
        histories: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) cosines of each history against all items.

        ``items`` is ``item_vectors(features)``.

        The histories are encoded from their text, so ``candidates``, when given, replaces
        ``items``.
        """
        scored = items if candidates is None else candidates
        return self.encode(self.history_ids(features, histories)) @ scored.T

    def loss(
        self, features: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """In-batch softmax cross-entropy.

        Each sequence's last target against the batch's other targets.

        A batch target equal to the row's own target is not counted as a negative.
        """
        targets = targets.cpu()
        target = last_items(targets)
        users = self.encode(self.history_ids(features, inputs))
        items = self.encode(self.item_ids(features, target))
        logits = users @ items.T / self.config.temperature
        duplicate = (target[:, None] == target[None, :]) & ~torch.eye(len(target), dtype=torch.bool)
        labels = torch.arange(len(target), device=logits.device)
        return F.cross_entropy(
            logits.masked_fill(duplicate.to(logits.device), float("-inf")), labels
        )
