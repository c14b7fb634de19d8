"""The server's merge of one model per domain.

Task vectors, the initial method, learned coefficients.

Everything here reads only what a party may send (its update, the task vector) and each
domain's public item table; with ``merge.learn.valid_candidates`` / ``valid_scales`` a
*judge* (the parties, on their valid split) scores candidate coefficients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator

from fedmerge.config import ConfigModel
from fedmerge.errors import FedmergeError
from fedmerge.merge.learn import LearnConfig, LearnResult, learn_coefficients, server_domain
from fedmerge.merge.methods import check_finite, method_params, prepare
from fedmerge.merge.rows import RowMode, usage_rows
from fedmerge.merge.vectors import StateDict, combine
from fedmerge.models import FamilyConfig, build_model
from fedmerge.train.loop import resolve_device


class MergeConfig(ConfigModel):
    """The server's merge: a training-free initialisation, then optionally learned coefficients."""

    method: str = Field(
        "ties", description="the training-free merge that initialises the coefficients"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="the method's parameters (see `fedmerge merge`)"
    )
    learn: LearnConfig = LearnConfig()
    rows: RowMode = Field(
        "usage",
        description="item-memory rows: merged by catalogue usage, or by the method "
        "(see fedmerge.merge.rows)",
    )

    @model_validator(mode="after")
    def _known_method(self) -> MergeConfig:
        # raises a FedmergeError naming the bad method or parameter
        method_params(self.method, self.params)
        return self


@dataclass
class Member:
    """One domain's part in the merge: its task vector and item table.

    The task vector is fine-tuned - base, over the floating tensors.
    """

    domain: str
    vector: StateDict
    table: torch.Tensor


@dataclass
class MergeOutcome:
    """The server's merge: the training-free initialisation, the learned merge, its coefficients."""

    initial: StateDict
    merged: StateDict
    coefficients: dict[str, Any]
    seconds: float
    teacher_bytes: int


Judge = Callable[[list[StateDict]], list[float]]
"""Scores candidate merged models: the parties' mean valid ndcg@10 over the domains, one each."""


def server_merge(
    base: StateDict,
    members: list[Member],
    model: FamilyConfig,
    seed: int,
    merge: MergeConfig,
    quiet: bool = True,
    judge: Judge | None = None,
    device: str = "cpu",
) -> MergeOutcome:
    """Merge one model per domain.

    The init method runs on the task vectors, then coefficients are learned on pseudo-users.

    ``base`` is the state the members started from in the family's merge space
    (:meth:`fedmerge.models.Recommender.merge_space`); their vectors must match its floating
    tensors. ``seed`` seeds the skeleton models (their weights are always overwritten). With
    ``merge.learn.valid_candidates`` or ``valid_scales``, `judge` scores the candidate coefficients
    and the best one is kept; its scores go into the coefficients. Teachers, pseudo-user walks and
    learned coefficients run on `device` (``train.device``); the result is on the CPU.
    """
    started = time.perf_counter()
    params = method_params(merge.method, merge.params)
    vectors = [m.vector for m in members]
    prepared = prepare(merge.method, vectors, params)
    width = members[0].table.shape[1]
    skeleton = build_model(model, width, seed).to(resolve_device(device))
    if merge.rows == "usage":
        usage = [skeleton.row_usage(m.table) for m in members]
        prepared = usage_rows(
            prepared, vectors, {key: torch.stack([u[key] for u in usage]) for key in usage[0]}
        )
    server = []
    if merge.learn.mode != "none":
        for member in members:
            teacher = build_model(model, width, seed)
            teacher.load_merged(combine(base, [member.vector], [1.0]))
            teacher.to(resolve_device(device))
            server.append(server_domain(member.domain, member.table, teacher, merge.learn))
    result = learn_coefficients(skeleton, base, prepared, server, merge.learn, quiet=quiet)
    check_finite(merge.method, params, result.merged)
    selection = _choose(result, judge) if result.candidates else None
    coefficients = {
        "method": merge.method,
        "params": params.model_dump(),
        "rows": merge.rows,
        "learn": merge.learn.model_dump(),
        "domains": [m.domain for m in members],
        "groups": result.groups,
        "initial": prepared.weights,
        "weights": result.weights.tolist(),
        "best_step": result.best_step,
        "selection": selection,
        "log": result.log,
    }
    return MergeOutcome(
        result.initial,
        result.merged,
        coefficients,
        time.perf_counter() - started,
        sum(d.teacher.nbytes for d in server if d.teacher),
    )


def _choose(result: LearnResult, judge: Judge | None) -> dict[str, Any]:
    """Keep the candidate with the best valid score (the earliest of equals) in `result`.

    Return what was scored.
    """
    if judge is None:
        raise FedmergeError(
            "learn.valid_candidates / valid_scales need the parties to score the candidates on "
            "their valid split, which only `fedmerge merge` and `fedmerge simulate` do; turn them "
            "off here"
        )
    started = time.perf_counter()
    scores = judge([c.merged for c in result.candidates])
    best = result.candidates[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    result.best_step, result.weights, result.merged = best.step, best.weights, best.merged
    return {
        "criterion": "mean valid ndcg@10 over the domains",
        "steps": [c.step for c in result.candidates],
        "scales": [c.scale for c in result.candidates],
        "scores": [float(v) for v in scores],
        "chosen_step": best.step,
        "chosen_scale": best.scale,
        "seconds": round(time.perf_counter() - started, 2),
    }
