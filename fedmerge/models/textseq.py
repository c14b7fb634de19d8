"""Text-based sequential recommender: text adaptor + text codes + SASRec-style causal transformer.

Items are represented only by their frozen text features (no ID embeddings), so every
domain's model has the same parameters whatever its catalogue, and task vectors align. An
item's vector is the adaptor's output (a mixture of whitening projections, as in UniSRec)
plus the embeddings of its locality-sensitive text codes (:class:`TextCodes`); a user's
vector is the causal transformer's output at the last item of the history. Scores are cosine
similarities (divided by a temperature in the loss), plus ``text_weight`` times the raw text
cosine to the last item, a weight chosen on validation after training (0 before).

The untrained model already ranks by text similarity to the last item: the experts start as
random orthogonal projections (which keep cosines roughly), the gate starts uniform, the code
rows at zero, and every residual block's output projection at zero, so the transformer starts
as the identity and the user vector is the last item's vector (the residual path from the text).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from fedmerge.data.domain import DomainData
from fedmerge.data.sequences import last_items, last_positions
from fedmerge.models.family import FamilyConfig, check_heads, register
from fedmerge.models.twotower import TwoTower
from fedmerge.text import feature_table, get_encoder


class TextSeqConfig(FamilyConfig):
    """The ``textseq`` family: frozen text features, text adaptor and codes, causal transformer."""

    kind: Literal["textseq"] = Field("textseq", description="the model family")
    encoder: Literal["minilm", "hashing"] = Field(
        "minilm", description="the frozen encoder of the item features"
    )
    dim: int = Field(128, ge=8, description="item / user vector size")
    layers: int = Field(2, ge=0, description="transformer layers")
    heads: int = Field(2, ge=1, description="attention heads; dim must be a multiple of it")
    dropout: float = Field(
        0.2, ge=0.0, lt=1.0, description="dropout rate in the transformer and adaptor"
    )
    experts: int = Field(
        4, ge=1, description="experts of the text adaptor (mixture of whitening projections)"
    )
    temperature: float = Field(
        0.05, gt=0.0, le=10.0, description="softmax temperature on cosine scores"
    )
    code_tables: int = Field(
        8, ge=0, description="hashed text-code embedding tables added to item vectors"
    )
    code_bits: int = Field(
        12, ge=1, le=20, description="bits of each text code (2**bits rows per table)"
    )
    negatives: int | None = Field(
        None,
        ge=1,
        description="sampled softmax over this many uniform negatives per batch when the catalogue "
        "is larger (None: full softmax over all items)",
    )
    text_weights: list[Annotated[float, Field(ge=0.0, le=100.0)]] = Field(
        [0.0, 0.1, 0.2, 0.3, 0.5],
        description="raw text-similarity weights tried on validation after training "
        "(the calibration)",
    )

    @model_validator(mode="after")
    def _buildable(self) -> TextSeqConfig:
        """Attention splits dim across heads."""
        check_heads(self.dim, self.heads)
        return self


class MoEAdaptor(nn.Module):
    """Mixture of whitening projections: sum_k g_k(x) (x - b_k) W_k, gate g = softmax(x G)."""

    def __init__(self, text_dim: int, dim: int, experts: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(experts, text_dim))
        projections = torch.stack(
            [nn.init.orthogonal_(torch.empty(text_dim, dim)) for _ in range(experts)]
        )
        self.projections = nn.Parameter(projections * (text_dim / dim) ** 0.5)
        self.gate = nn.Parameter(torch.zeros(text_dim, experts))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, text_dim) features -> (N, dim) item vectors."""
        n_experts, text_dim, dim = self.projections.shape
        # (x - b_k) W_k = x W_k - b_k W_k: one matrix product for all experts
        stacked = self.projections.permute(1, 0, 2).reshape(text_dim, n_experts * dim)
        experts = (features @ stacked).view(-1, n_experts, dim) - torch.einsum(
            "kt,ktd->kd", self.centers, self.projections
        )
        weights = torch.softmax(features @ self.gate, dim=-1)
        return (weights[:, :, None] * experts).sum(1)


class TextCodes(nn.Module):
    """Embeddings of locality-sensitive text codes: sum_t E_t[sign bits of x R_t].

    Each table hashes an item's text features with fixed random hyperplanes ``R_t`` (a buffer
    drawn from the model seed) into one of 2**bits rows. Items with similar texts share rows in
    every domain, so the tables have one layout and one meaning across domains, while the
    combination of codes is nearly unique per item: it gives the model item-level capacity
    without ID embeddings. Rows start at zero (the untrained model is unchanged).
    """

    planes: torch.Tensor  # buffers, registered in __init__
    powers: torch.Tensor
    offsets: torch.Tensor

    def __init__(self, text_dim: int, dim: int, tables: int, bits: int) -> None:
        super().__init__()
        self.register_buffer("planes", torch.randn(tables, text_dim, bits))
        self.register_buffer("powers", 2 ** torch.arange(bits))
        self.register_buffer("offsets", torch.arange(tables) * 2**bits)
        self.rows = nn.Embedding(tables * 2**bits, dim)
        nn.init.zeros_(self.rows.weight)

    def codes(self, features: torch.Tensor) -> torch.Tensor:
        """(N, text_dim) features -> (N, tables) the row each item reads in each table."""
        bits = torch.einsum("nt,ktb->nkb", features, self.planes) > 0
        return (bits.long() * self.powers).sum(-1) + self.offsets

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, text_dim) features -> (N, dim) summed code embeddings."""
        return self.rows(self.codes(features)).sum(1)


@register
class TextSeqRec(TwoTower[TextSeqConfig]):
    """The default recommender (see the module docstring)."""

    kind = "textseq"
    Config = TextSeqConfig
    pretrain_frozen = ["blocks", "positions", "codes"]
    """Pretrained on public domains, the transformer blocks, positions and text-code rows move a
    user vector away from its last item's text and make the base worse than theta_0 zero-shot
    on every federation domain; the adaptor alone keeps theta_0's text-similarity quality."""
    block_pattern = re.compile(r"blocks\.layers\.(\d+)\.")
    config: TextSeqConfig
    text_weight: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, config: TextSeqConfig, text_dim: int) -> None:
        super().__init__(config, text_dim)
        self.text_dim = text_dim
        self.adaptor = MoEAdaptor(text_dim, config.dim, config.experts)
        self.codes = (
            TextCodes(text_dim, config.dim, config.code_tables, config.code_bits)
            if config.code_tables
            else None
        )
        self.positions = nn.Parameter(torch.zeros(config.max_len, config.dim))
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            config.dim,
            config.heads,
            dim_feedforward=2 * config.dim,
            dropout=config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.register_buffer("text_weight", torch.zeros(()))
        for block in self.blocks.layers:
            nn.init.zeros_(block.self_attn.out_proj.weight)
            nn.init.zeros_(block.self_attn.out_proj.bias)
            nn.init.zeros_(block.linear2.weight)
            nn.init.zeros_(block.linear2.bias)

    @classmethod
    def catalogue(
        cls, domain: DomainData, config: TextSeqConfig, quiet: bool = True
    ) -> torch.Tensor:
        """The frozen encoder's (n_items, text_dim) feature table of the items' text.

        It is cached per domain.
        """
        return torch.from_numpy(feature_table(domain, get_encoder(config.encoder), quiet=quiet))

    def item_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """(N, text_dim) item features -> (N, dim) unit item vectors."""
        vectors = self.adaptor(features)
        return F.normalize(
            vectors + self.codes(features) if self.codes is not None else vectors, dim=-1
        )

    @torch.no_grad()
    def row_usage(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """How many of a catalogue's items read each row of the item-memory tables.

        See :mod:`fedmerge.merge.rows`.
        """
        if self.codes is None:
            return {}
        rows = self.codes.rows.weight
        return {
            "codes.rows.weight": torch.bincount(
                self.codes.codes(features.to(rows.device)).flatten(), minlength=len(rows)
            ).cpu()
        }

    def sequence_states(self, item_vectors: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, L, dim) after each position of right-padded histories (B, L), pad = -1.

        Causal attention: position t sees positions <= t only, so padding on the right is never
        seen by a real position.
        """
        length = histories.shape[1]
        x = item_vectors[histories.clamp(min=0)] + self.positions[:length]
        mask = torch.triu(torch.full((length, length), float("-inf"), device=x.device), diagonal=1)
        return self.blocks(self.dropout(x), mask=mask, is_causal=True)

    def user_vectors(self, item_vectors: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        """(B, dim) unit user vectors: the state at each history's last item."""
        states = self.sequence_states(item_vectors, histories)
        return F.normalize(states[torch.arange(len(histories)), last_positions(histories)], dim=-1)

    def scores(
        self,
        features: torch.Tensor,
        items: torch.Tensor,
        histories: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) cosine scores of right-padded histories (B, L) against all N items.

        The scores are before the temperature.

        ``items`` is ``item_vectors(features)``, computed once by the caller; the histories are read
        with it, and the items are scored with ``candidates`` (default: ``items``).
        """
        last = last_items(histories)
        scored = items if candidates is None else candidates
        return self.user_vectors(items, histories) @ scored.T + self.text_scores(features, last)

    def score_terms(
        self, features: torch.Tensor, items: torch.Tensor, histories: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two terms of :meth:`scores` over all items, apart.

        The learned cosine scores and the raw text cosine to each history's last item (the text
        prior before ``text_weight``).
        """
        last = last_items(histories)
        unit = F.normalize(features, dim=-1)
        return self.user_vectors(items, histories) @ items.T, unit[last] @ unit.T

    def text_scores(
        self, features: torch.Tensor, last: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> torch.Tensor | float:
        """The fused text prior: ``text_weight`` x raw text cosine of each `last` item to all items.

        With ``candidates``: to every item of ``candidates``.

        ``text_weight`` is not trained: it is 0 until chosen on validation after training
        (the family's calibration, :func:`fedmerge.train.loop.calibrate`).
        """
        if not self.text_weight:
            return 0.0
        unit = F.normalize(features, dim=-1)
        return self.text_weight * (
            unit[last] @ (unit if candidates is None else unit[candidates]).T
        )

    def calibration(self) -> list[float]:
        """The text weights tried on validation after training (``model.text_weights``)."""
        return list(dict.fromkeys(self.config.text_weights))

    def calibration_scores(
        self, features: torch.Tensor
    ) -> Callable[[torch.Tensor], Iterator[torch.Tensor]]:
        """Scores with each text weight in turn, sharing the model's pass and the text prior."""
        items = self.item_vectors(features)

        def variants(histories: torch.Tensor) -> Iterator[torch.Tensor]:
            learned, prior = self.score_terms(features, items, histories)
            for weight in self.calibration():
                yield learned + weight * prior if weight else learned

        return variants

    def calibrate(self, value: float) -> None:
        """Set the text weight to `value`."""
        self.text_weight.fill_(value)

    def facts(self) -> dict[str, float]:
        """The text weight the model is evaluated with."""
        return {"text_weight": round(float(self.text_weight), 6)}

    def loss(
        self, features: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Softmax cross-entropy at every position of every sequence (SASRec-style).

        ``inputs`` (B, L) are items 0..L-1 of each training sequence, ``targets`` (B, L) the items
        that follow them; both right-padded with -1. The softmax runs over all items, or, when
        ``negatives`` is smaller than the catalogue, over each target and ``negatives`` items drawn
        uniformly (shared by the batch) with the log-Q correction ``log(N / negatives)``, so the
        loss still estimates the full softmax; item vectors are then computed only for the items the
        batch touches.
        """
        logits, labels = self._logits(features, inputs, targets)
        return F.cross_entropy(logits, labels)

    def record_losses(
        self, features: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Each sequence's mean cross-entropy over its positions (negatives are drawn data-free)."""
        logits, labels = self._logits(features, inputs, targets)
        rows = (targets >= 0).nonzero()[:, 0]
        per_position = F.cross_entropy(logits, labels, reduction="none")
        total = torch.zeros(len(inputs), dtype=per_position.dtype, device=per_position.device)
        total = total.index_add(0, rows, per_position)
        return total / torch.bincount(rows, minlength=len(inputs)).clamp(min=1)

    def _logits(
        self, features: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of every real position of the batch (see :meth:`loss`), row-major."""
        valid, negatives = targets >= 0, self.config.negatives
        if negatives is None or negatives >= len(features):
            items = self.item_vectors(features)
            users = F.normalize(self.sequence_states(items, inputs)[valid], dim=-1)
            logits = (
                users @ items.T + self.text_scores(features, inputs[valid])
            ) / self.config.temperature
            return logits, targets[valid]
        sampled = torch.randint(len(features), (negatives,), device=inputs.device)
        needed, local = torch.unique(
            torch.cat([inputs.flatten(), targets.flatten(), sampled]).clamp(min=0),
            return_inverse=True,
        )
        local_inputs = torch.where(inputs >= 0, local[: inputs.numel()].view_as(inputs), -1)
        items = self.item_vectors(features[needed])
        users = F.normalize(self.sequence_states(items, local_inputs)[valid], dim=-1)
        last, target = inputs[valid], targets[valid]
        positive = (
            users * items[local[inputs.numel() : 2 * inputs.numel()].view_as(targets)[valid]]
        ).sum(-1)
        negative = users @ items[local[2 * inputs.numel() :]].T
        text = self.text_scores(features, last, sampled)
        if torch.is_tensor(text):
            unit = F.normalize(features, dim=-1)
            positive = positive + self.text_weight * (unit[last] * unit[target]).sum(-1)
        negative = (negative + text) / self.config.temperature + math.log(len(features) / negatives)
        logits = torch.cat(
            [
                positive[:, None] / self.config.temperature,
                negative.masked_fill(sampled[None, :] == target[:, None], float("-inf")),
            ],
            dim=1,
        )
        return logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device)
