"""Two-tower families: a user vector from the history, an item vector per item, dot products.

:class:`TwoTower` implements the scoring parts of the family contract once for every such
family from two methods, ``item_vectors`` and ``scores``. Learned merging reads the histories
with the current weights' item vectors and scores the candidates with the initial merge's
vectors (``fixed``, MergeRec), the same but with the history items' current vectors
(``history``), or every item's current vector (``current``).
"""

from __future__ import annotations

import re
from typing import ClassVar, TypeVar

import torch

from fedmerge.models.family import FamilyConfig, HistoryScorer, ItemVectors, Recommender

C = TypeVar("C", bound=FamilyConfig)


class TwoTower(Recommender[C]):
    """A family whose scores are user vectors against item vectors (see the module docstring)."""

    block_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^$.")
    """Matches a tensor of transformer block N (group 1: N).

    Every other tensor is in group ``others``.
    """

    def item_vectors(self, table: torch.Tensor) -> torch.Tensor:
        """(n_items, dim) item vectors."""
        raise NotImplementedError

    def scores(
        self,
        table: torch.Tensor,
        items: torch.Tensor,
        histories: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) scores of `histories` read with the item vectors `items`, against `candidates`.

        `candidates` defaults to `items`.
        """
        raise NotImplementedError

    def scorer(self, table: torch.Tensor) -> HistoryScorer:
        """Scores of all items for histories, with the item vectors computed once."""
        items = self.item_vectors(table)
        return lambda histories: self.scores(table, items, histories)

    def parameter_group(self, name: str) -> str:
        """``block N`` for a tensor of transformer block N, else ``others``."""
        match = self.block_pattern.search(name)
        return f"block {int(match.group(1))}" if match else "others"

    def merge_anchor(self, table: torch.Tensor) -> torch.Tensor:
        """The item vectors of the initial merge's weights (no gradients)."""
        # not inference mode: the anchor is saved for the coefficients' gradients
        with torch.no_grad():
            return self.item_vectors(table)

    def student_scores(
        self,
        table: torch.Tensor,
        anchor: torch.Tensor,
        histories: torch.Tensor,
        follow: ItemVectors,
    ) -> torch.Tensor:
        """Pseudo-users' scores of all items, with the item vectors `follow` names."""
        if follow == "current":
            return self.scores(table, self.item_vectors(table), histories)
        seen = histories[histories >= 0].unique()
        items = anchor.index_put((seen,), self.item_vectors(table[seen]))
        return self.scores(table, items, histories, anchor if follow == "fixed" else None)
