"""Learned merge coefficients (MergeRec): theta = theta_0 + sum_k w_k tau~_k, only w is trained.

``w`` is task-wise (one scalar per domain), layer-wise (one per domain per parameter group, as
the family groups its tensors: each transformer block, and one group for everything else;
MergeRec's grouping) or tensor-wise (one per domain per parameter tensor, as AdaMerging's
layer-wise coefficients). The merged parameters are built functionally at every step
(``torch.func.functional_call``), so no model copies pile up. The student's scores come from
the family (:meth:`fedmerge.models.Recommender.student_scores`): for a two-tower family the
pseudo-users' histories are read with the current coefficients' item vectors, so every group
receives gradients, and the candidates are scored with the initial merge's vectors
(``item_vectors = "fixed"``, MergeRec's recipe), the same but with the history items' current
vectors (``"history"``, the default), or every item's current vector (``"current"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from torch import nn

from fedmerge.config import ConfigModel, LearningRate
from fedmerge.data.sequences import last_items
from fedmerge.errors import FedmergeError
from fedmerge.merge.losses import LOSSES, NEEDS_TEACHER
from fedmerge.merge.methods import Prepared
from fedmerge.merge.pseudo import (
    PseudoConfig,
    PseudoUsers,
    candidate_walk_users,
    check_candidates,
    one_item_users,
    select_items,
    walk_users,
    with_candidates,
)
from fedmerge.merge.teacher import (
    Teacher,
    candidate_scores,
    candidate_teacher,
    neighbours,
    teacher_scores,
)
from fedmerge.merge.vectors import StateDict, combine
from fedmerge.models import Recommender
from fedmerge.models.family import ItemVectors
from fedmerge.progress import progress_bar
from fedmerge.train.loop import deterministic

_OUT = 1e4  # how far below every other score a left-out item is put (scores are cosines, about 1)
Mode = Literal["none", "task-wise", "layer-wise", "tensor-wise"]


class LearnConfig(ConfigModel):
    """Learning the merge coefficients on pseudo-users (MergeRec's published defaults)."""

    mode: Mode = Field(
        "task-wise",
        description="coefficients learned: none, one per domain (task-wise), per domain "
        "and layer group (layer-wise), or per domain and tensor (tensor-wise)",
    )
    loss: Literal[tuple(LOSSES)] = Field(  # type: ignore[valid-type]  # the registry's names
        "mergerec",
        description="mergerec (CE + KL to the teacher), adamerging (entropy), kd (KL only) or ce",
    )
    temperature: float = Field(0.05, gt=0.0, le=10.0, description="T of the KL term's softmaxes")
    kd_weight: float = Field(
        2.5, ge=0.0, le=1000.0, description="beta * T^2, the weight of the KL term"
    )
    lr: LearningRate = Field(1e-3, description="Adam learning rate of the coefficients")
    batch_size: int = Field(16, ge=1, description="pseudo-users per step")
    steps: int = Field(500, ge=0, description="optimisation steps (0: the training-free merge)")
    valid_candidates: int = Field(
        0,
        ge=0,
        description="coefficient snapshots at evenly spaced steps, the initial "
        "merge first, that the parties score on their valid split; the best mean valid "
        "ndcg@10 over the domains is kept (0: the last step)",
    )
    valid_scales: list[float] = Field(
        default_factory=list,
        description="factors of the learned coefficients (the initial ones when nothing is "
        "learned) that the parties score on their valid split, with the initial merge and any "
        "valid_candidates snapshots; the best mean valid ndcg@10 is kept, so the pseudo-users "
        "choose the coefficients' shape and the parties their size (empty: off)",
    )
    item_vectors: ItemVectors = Field(
        "history",
        description="which vectors follow the coefficients during learning: 'fixed' (MergeRec: "
        "every candidate is scored with the initial merge's vectors, the histories are read with "
        "the current ones), 'history' (the pseudo-users' history items also score as candidates "
        "with their current vectors), 'current' (every item's vector, recomputed at every step)",
    )
    teacher_top_k: int = Field(
        200, ge=0, description="teacher scores kept per pseudo-user (0 = dense)"
    )
    fit_scale: bool = Field(
        True,
        description="kd / mergerec: learn one score scale per domain for the KL term, "
        "so that it compares rankings, not the merged model's sharpness",
    )
    scale_lr: LearningRate = Field(0.05, description="Adam lr of the log score scales (fit_scale)")
    balance: bool = Field(
        False,
        description="every domain weighs the same in each step, "
        "whatever its catalogue size (false: uniform over all pseudo-users, "
        "as in MergeRec)",
    )
    seed: int = Field(0, description="seed of the batch order and of the candidate lists")
    candidates: int | None = Field(
        None,
        ge=1,
        description="score each pseudo-user's own item among this many other items of its "
        "catalogue (uniform, seeded) instead of every item: for families that rank candidate "
        "lists only, such as a language model (walks then step on candidate pools of this "
        "size; None: every item)",
    )
    pseudo: PseudoConfig = PseudoConfig()

    @model_validator(mode="after")
    def _one_selection(self) -> LearnConfig:
        if self.valid_candidates == 1:
            raise FedmergeError(
                "learn.valid_candidates = 1 would keep only the initial merge; give 0 (off) or >= 2"
            )
        if self.candidates is not None and self.pseudo.target == "next":
            raise FedmergeError(
                "learn.candidates with learn.pseudo.target = next is not supported (the loss "
                "would have to leave the history's last item out of each candidate list); set "
                "learn.pseudo.target = last"
            )
        if any(not 0.0 < c < 100.0 for c in self.valid_scales):
            raise FedmergeError(
                f"learn.valid_scales must be factors in (0, 100); got {self.valid_scales}"
            )
        return self

    def candidate_steps(self) -> list[int]:
        """The steps whose coefficients the parties score on valid (step 0: the initial merge).

        Empty when off.
        """
        if not self.valid_candidates:
            return [0] if self.valid_scales else []
        return sorted(
            {
                round(i * self.steps / (self.valid_candidates - 1))
                for i in range(self.valid_candidates)
            }
        )


@dataclass
class ServerDomain:
    """What the server holds for one domain.

    Its public item table, pseudo-users and their teacher scores.
    """

    name: str
    features: torch.Tensor
    users: PseudoUsers
    teacher: Teacher | None


@dataclass
class Candidate:
    """A merge the parties may score on valid: the coefficients of `step` times `scale`.

    It also holds the merge's weights.
    """

    step: int
    scale: float
    weights: torch.Tensor
    merged: StateDict


@dataclass
class LearnResult:
    """The learned coefficients (K, groups), the initial and learned merged weights, the step log.

    ``candidates`` holds the snapshots at :meth:`LearnConfig.candidate_steps` and the final
    coefficients times each of ``valid_scales``, for the parties to choose from on their valid
    split (:func:`fedmerge.protocol.server_merge`).
    """

    weights: torch.Tensor
    initial: StateDict
    merged: StateDict
    groups: list[str]
    log: list[dict] = field(default_factory=list)
    best_step: int | None = None
    candidates: list[Candidate] = field(default_factory=list)


def parameter_groups(
    model: Recommender, keys: list[str], mode: Mode
) -> tuple[dict[str, int], list[str]]:
    """Group index of every key, and the group names.

    One group, the family's layer groups (in the order they first appear,
    :meth:`Recommender.parameter_group`), or one per key.
    """
    if mode == "tensor-wise":
        return {k: i for i, k in enumerate(keys)}, list(keys)
    if mode != "layer-wise":
        return {k: 0 for k in keys}, ["all"]
    names = list(dict.fromkeys(model.parameter_group(k) for k in keys))
    return {k: names.index(model.parameter_group(k)) for k in keys}, names


class _Student(nn.Module):
    """The family's student scores with the current parameters.

    See :meth:`Recommender.student_scores`.
    """

    def __init__(self, model: Recommender, follow: ItemVectors) -> None:
        super().__init__()
        self.model = model
        self.follow = follow

    def forward(
        self,
        table: torch.Tensor,
        anchor: object,
        histories: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if candidates is None:
            return self.model.student_scores(table, anchor, histories, self.follow)
        return self.model.student_candidate_scores(
            table, anchor, histories, candidates, self.follow
        )


@deterministic()
def learn_coefficients(
    model: Recommender,
    base: StateDict,
    prepared: Prepared,
    domains: list[ServerDomain],
    config: LearnConfig,
    quiet: bool = False,
) -> LearnResult:
    """Learn w on the domains' pseudo-users; return the last step's coefficients and merged weights.

    ``model`` is any instance of the merged models' architecture; its weights are overwritten
    with the initial merge (which scores the fixed candidate items). Everything is computed on
    the model's device; the merged weights come back on the CPU.
    """
    device = next(model.parameters()).device
    base = _to(base, device)
    prepared = Prepared([_to(v, device) for v in prepared.vectors], prepared.weights)
    keys = list(prepared.vectors[0])
    group_of, group_names = parameter_groups(model, keys, config.mode)
    initial = torch.tensor(prepared.weights, dtype=torch.float32, device=device)
    weights = nn.Parameter(initial[:, None].repeat(1, len(group_names)))
    initial_merge = _to(combine(base, prepared.vectors, prepared.weights), torch.device("cpu"))
    result = LearnResult(weights.detach().clone(), initial_merge, initial_merge, group_names)
    # nothing learned: the scales apply to the initial coefficients
    if config.mode == "none" or config.steps == 0:
        if config.valid_scales:
            _add_scaled(
                result, base, prepared, group_of, 0, result.weights, [1.0, *config.valid_scales]
            )
        result.weights = result.weights.cpu()
        return result
    student = _Student(model, config.item_vectors).eval()
    model.load_merged(result.merged)
    tables = [d.features.to(device) for d in domains]
    anchors = [model.merge_anchor(table) for table in tables]
    loss_fn = LOSSES[config.loss]
    log_scales = nn.Parameter(torch.zeros(len(domains), device=device))
    groups: list[dict[str, Any]] = [{"params": [weights]}]
    if config.fit_scale and config.loss in NEEDS_TEACHER:
        groups.append({"params": [log_scales], "lr": config.scale_lr})
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    rng = np.random.default_rng(config.seed)
    pool = _pool([d.users for d in domains])
    chance = _chances(pool) if config.balance else None

    def merged_params() -> StateDict:
        return {
            f"model.{k}": v
            for k, v in build_merged(base, prepared.vectors, weights, group_of).items()
        }

    def batch_loss(params: StateDict, picks: np.ndarray) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for k in np.unique(picks[:, 0]):
            d = domains[k]
            users, teacher = d.users, d.teacher
            rows = torch.from_numpy(picks[picks[:, 0] == k, 1])
            histories = users.histories[rows].to(device)
            lists = None if users.candidates is None else users.candidates[rows].to(device)
            scores = torch.func.functional_call(
                student, params, (tables[k], anchors[k], histories, lists)
            )
            target = teacher.dense(rows).to(device) if teacher is not None else None
            if config.pseudo.target == "next":
                scores, target = _without_last(histories, scores, target)
            # the own item: its column in the candidate lists (the first), or its item id
            own = (
                torch.zeros(len(rows), dtype=torch.long) if lists is not None else users.items[rows]
            )
            loss = loss_fn(
                scores,
                target,
                own.to(device),
                config.temperature,
                config.kd_weight,
                log_scales[k].exp(),
            )
            total = total + loss * len(rows)
        return total / len(picks)

    snapshot_at = set(config.candidate_steps())

    def snapshot(step: int) -> None:
        if step in snapshot_at:
            result.candidates.append(
                _candidate(base, prepared, group_of, step, weights.detach().clone())
            )

    snapshot(0)
    with progress_bar(
        TextColumn("[bold]learning merge coefficients"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        quiet=quiet,
    ) as progress:
        task = progress.add_task("learn", total=config.steps, loss=float("nan"))
        for step in range(1, config.steps + 1):
            picks = pool[
                rng.choice(
                    len(pool), size=min(config.batch_size, len(pool)), replace=False, p=chance
                )
            ]
            loss = batch_loss(merged_params(), picks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            entry = {
                "step": step,
                "loss": loss.item(),
                "weights": weights.detach().tolist(),
                "scales": log_scales.detach().exp().tolist(),
            }
            result.log.append(entry)
            snapshot(step)
            progress.update(task, advance=1, loss=entry["loss"])
    final = weights.detach().clone()
    with torch.no_grad():
        result.merged = _to(
            build_merged(base, prepared.vectors, final, group_of), torch.device("cpu")
        )
    _add_scaled(result, base, prepared, group_of, config.steps, final, config.valid_scales)
    result.weights = final.cpu()
    return result


def _add_scaled(
    result: LearnResult,
    base: StateDict,
    prepared: Prepared,
    group_of: dict[str, int],
    step: int,
    weights: torch.Tensor,
    scales: list[float],
) -> None:
    """Append the candidates `weights` (those of `step`) times each of `scales`.

    Any (step, scale) already there is skipped (a ``valid_candidates`` snapshot of the last step, or
    a repeated factor): each candidate is one more valid evaluation of every party.
    """
    have = {(c.step, c.scale) for c in result.candidates}
    result.candidates += [
        _candidate(base, prepared, group_of, step, weights, scale)
        for scale in dict.fromkeys(scales)
        if (step, scale) not in have
    ]


def _candidate(
    base: StateDict,
    prepared: Prepared,
    group_of: dict[str, int],
    step: int,
    weights: torch.Tensor,
    scale: float = 1.0,
) -> Candidate:
    """The candidate merge with the coefficients `weights` (those of `step`) times `scale`.

    Its weights are on the CPU.
    """
    scaled = weights * scale
    with torch.no_grad():
        return Candidate(
            step,
            scale,
            scaled.cpu(),
            _to(build_merged(base, prepared.vectors, scaled, group_of), torch.device("cpu")),
        )


def _to(state: StateDict, device: torch.device) -> StateDict:
    """`state` with every tensor on `device` (the same tensors where they are there already)."""
    return {k: v.to(device) for k, v in state.items()}


def build_merged(
    base: StateDict, vectors: list[StateDict], weights: torch.Tensor, group_of: dict[str, int]
) -> StateDict:
    """theta_0 + sum_k weights[k, group(key)] * vectors[k][key] (differentiable in `weights`)."""
    merged = dict(base)
    for key in vectors[0]:
        merged[key] = base[key] + sum(
            weights[k, group_of[key]] * v[key] for k, v in enumerate(vectors)
        )
    return merged


def _without_last(
    histories: torch.Tensor, scores: torch.Tensor, teacher: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student and teacher scores with each history's last item pushed out of every softmax.

    Its score is set 1e4 below the rest: finite, so a KL term over it stays defined.
    """
    last = last_items(histories)[:, None]

    def drop(s: torch.Tensor) -> torch.Tensor:
        return s.scatter(1, last, float(s.detach().min()) - _OUT)

    return drop(scores), None if teacher is None else drop(teacher)


def _pool(groups: list[PseudoUsers | None]) -> np.ndarray:
    """(n, 2) rows of (domain index, pseudo-user index) over every domain's group (None: none)."""
    rows = [
        np.stack([np.full(len(g.items), k), np.arange(len(g.items))], 1)
        for k, g in enumerate(groups)
        if g is not None
    ]
    return np.concatenate(rows) if rows else np.empty((0, 2), dtype=np.int64)


def _chances(pool: np.ndarray) -> np.ndarray:
    """Sampling probability of each pool row such that every domain's rows together get 1 / K."""
    domains, index, counts = np.unique(pool[:, 0], return_inverse=True, return_counts=True)
    return 1.0 / (len(domains) * counts[index])


def server_domain(
    name: str, features: torch.Tensor, teacher_model: Recommender, config: LearnConfig
) -> ServerDomain:
    """Pseudo-users of one domain (from its public item table) with the teacher's scores.

    The teacher is the domain's fine-tuned model.
    """
    pseudo = config.pseudo
    starts = select_items(features, pseudo)
    if config.candidates is not None:
        check_candidates(config.candidates, len(features))
    if config.candidates is not None and pseudo.walk_length > 1:
        users = candidate_walk_users(
            starts,
            partial(candidate_scores, teacher_model, features),
            len(features),
            pseudo.walk_length,
            pseudo.walk_top,
            config.candidates,
            pseudo.seed,
            pseudo.mixed_lengths,
        )
    elif pseudo.walk_length > 1 or pseudo.target == "next":
        near = neighbours(teacher_model, features, pseudo.walk_top, config.temperature)
        users = walk_users(
            starts,
            near,
            pseudo.walk_length,
            pseudo.seed,
            pseudo.mixed_lengths,
            next_item=pseudo.target == "next",
        )
    else:
        users = one_item_users(starts)
    if config.candidates is not None:
        users = with_candidates(users, len(features), config.candidates, config.seed)
    teacher = None
    if config.loss in NEEDS_TEACHER:
        teacher = (
            teacher_scores(teacher_model, features, users, config.teacher_top_k, config.temperature)
            if users.candidates is None
            else candidate_teacher(teacher_model, features, users)
        )
    return ServerDomain(name, features, users, teacher)
