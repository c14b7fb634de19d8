"""Teacher scores: each domain's fine-tuned model scores all of its items for each pseudo-user.

Computed once, in chunks of pseudo-users. A dense (pseudo-users x items) table is ~5 GB at
35k items, so by default only each row's top ``top_k`` scores are kept, plus one *floor*
value standing for every other item: the floor is chosen so that the tail keeps its exact
total softmax mass at temperature T, ``(N - k) exp(floor / T) = sum_tail exp(s / T)``. The
top-k probabilities of the rebuilt row are then exact, and only how the (small) tail mass
spreads over tail items is approximated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedmerge.merge.pseudo import PseudoUsers
from fedmerge.models import Recommender


@dataclass
class Teacher:
    """Top-k teacher scores (P, k), their item indices (int32), a floor per row, catalogue size."""

    values: torch.Tensor
    indices: torch.Tensor
    floor: torch.Tensor
    n_items: int

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), n_items) scores rebuilt from the stored top-k and the floor."""
        out = self.floor[rows, None].expand(len(rows), self.n_items).clone()
        return out.scatter_(1, self.indices[rows].long(), self.values[rows])

    @property
    def nbytes(self) -> int:
        """The memory the stored scores take, in bytes."""
        return sum(t.element_size() * t.numel() for t in (self.values, self.indices, self.floor))


def teacher_scores(
    model: Recommender,
    features: torch.Tensor,
    users: PseudoUsers,
    top_k: int,
    temperature: float,
    batch_size: int = 1024,
) -> Teacher:
    """Score every item for every pseudo-user with `model`.

    Eval mode, no gradients, on the model's device; the scores are kept on the CPU.

    ``top_k`` <= 0 or >= the catalogue keeps the dense table (floor unused).
    """
    model.eval()
    device = next(model.parameters()).device
    features, n_items = features.to(device), len(features)
    keep = n_items if top_k <= 0 else min(top_k, n_items)
    values, indices, floors = [], [], []
    with torch.inference_mode():
        score = model.scorer(features)
        for start in range(0, len(users.items), batch_size):
            scores = score(users.histories[start : start + batch_size].to(device)).float().cpu()
            top = scores.topk(keep, dim=1)
            values.append(top.values)
            indices.append(top.indices.int())
            floors.append(
                _tail_floor(scores, top.indices, temperature)
                if keep < n_items
                else torch.zeros(len(scores))
            )
    return Teacher(torch.cat(values), torch.cat(indices), torch.cat(floors), n_items)


def candidate_scores(
    model: Recommender,
    features: torch.Tensor,
    histories: torch.Tensor,
    lists: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """`model`'s scores (on the CPU) of each history's candidate list, (P, C).

    Eval mode, no gradients, on the model's device.
    """
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        score = model.candidate_scorer(features.to(device))
        return torch.cat(
            [
                score(
                    histories[start : start + batch_size].to(device),
                    lists[start : start + batch_size].to(device),
                )
                .float()
                .cpu()
                for start in range(0, len(lists), batch_size)
            ]
        )


def candidate_teacher(model: Recommender, features: torch.Tensor, users: PseudoUsers) -> Teacher:
    """`model`'s scores of each pseudo-user's candidate list, (P, C + 1), as a dense teacher.

    The rebuilt rows (:meth:`Teacher.dense`) are these scores in candidate order.
    """
    assert users.candidates is not None
    lists = users.candidates
    values = candidate_scores(model, features, users.histories, lists)
    width = lists.shape[1]
    indices = torch.arange(width, dtype=torch.int32).expand(len(lists), width).contiguous()
    return Teacher(values, indices, torch.zeros(len(lists)), width)


def _tail_floor(scores: torch.Tensor, top: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, the score given to every non-top item that keeps the tail's softmax mass.

    The mass is that of the full row at `temperature`.
    """
    tail = scores.scatter(1, top, float("-inf")) / temperature
    return temperature * (torch.logsumexp(tail, dim=1) - math.log(scores.shape[1] - top.shape[1]))


def neighbours(
    model: Recommender, features: torch.Tensor, top: int, temperature: float
) -> torch.Tensor:
    """(n_items, top) each item's best-scored other items by `model` for the history ``[i]``."""
    n = len(features)
    items = torch.arange(n)
    found = teacher_scores(
        model, features, PseudoUsers(items[:, None], items), min(n, top + 1), temperature
    ).indices.long()
    # the item itself moves to the end
    last_if_self = (found == items[:, None]).float().argsort(dim=1, stable=True)
    return found.gather(1, last_if_self)[:, : min(top, n - 1)]
