"""Losses for learning merge coefficients on pseudo-users (student = the merged model's scores).

All take raw scores (cosines, before any temperature), as MergeRec does: ``mergerec`` =
CE(student, own item) + weight * KL(softmax(teacher / T) || softmax(scale * student / T)), with
weight = beta * T^2 (2.5 by default); ``kd`` the KL term alone; ``ce`` the CE term alone;
``adamerging`` the entropy of softmax(student / T) (no teacher, no labels). ``scale`` is the
student's fitted score scale for the KL term (1 = MergeRec's loss; see
:class:`fedmerge.merge.learn.LearnConfig`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

LossFn = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor, float, float, torch.Tensor | float],
    torch.Tensor,
]


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )


def mergerec(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    own: torch.Tensor,
    temperature: float,
    weight: float,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """MergeRec's loss: CE on each pseudo-user's own item + `weight` x KL to the teacher."""
    assert teacher is not None  # NEEDS_TEACHER: the learner computes teacher scores for this loss
    return F.cross_entropy(student, own) + weight * _kl(scale * student, teacher, temperature)


def kd(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    own: torch.Tensor,
    temperature: float,
    weight: float,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """The KL term alone: `weight` x KL(softmax(teacher / T) || softmax(scale * student / T))."""
    assert teacher is not None  # NEEDS_TEACHER: the learner computes teacher scores for this loss
    return weight * _kl(scale * student, teacher, temperature)


def ce(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    own: torch.Tensor,
    temperature: float,
    weight: float,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """The CE term alone: cross-entropy of the student's scores against each own item."""
    return F.cross_entropy(student, own)


def adamerging(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    own: torch.Tensor,
    temperature: float,
    weight: float,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """AdaMerging's loss: the mean entropy of softmax(student / T); no teacher, no labels."""
    log_p = F.log_softmax(student / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


LOSSES: dict[str, LossFn] = {"mergerec": mergerec, "kd": kd, "ce": ce, "adamerging": adamerging}
NEEDS_TEACHER = {"mergerec", "kd"}
