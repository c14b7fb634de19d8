"""The federation's steps, written once as plain functions over small typed values.

A *party* holds one domain's private users (or one shard of them, when a domain is split
across several parties): it trains from the weights it receives and evaluates weights on its
private splits. The *server* averages the parties of one domain (FedAvg), merges the domains
(training-free initialisation, then learned coefficients on pseudo-users) and aggregates the
parties' metrics. :mod:`fedmerge.pipeline` calls these functions in one process; ``clients/``
and ``server/`` call the very same functions from Flower handlers. Between the two sides pass
only weights, item-feature tables (public catalogue), configs and aggregate metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from fedmerge.config import ConfigModel, ModelConfig, TrainConfig
from fedmerge.data.domain import user_subset
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain
from fedmerge.merge import method_params
from fedmerge.merge.learn import LearnConfig, LearnResult, learn_coefficients, server_domain
from fedmerge.merge.methods import check_finite, prepare
from fedmerge.merge.rows import RowMode, usage_rows
from fedmerge.merge.vectors import StateDict, check_aligned, task_vector
from fedmerge.models import TextSeqRec
from fedmerge.models.scoring import model_scorer
from fedmerge.runs.results import Row, metric_row
from fedmerge.train.checkpoint import build_model
from fedmerge.train.loop import (
    Part,
    choose_text_weight,
    fit,
    fit_text_weight,
    reads_every_user,
    text_weight_metrics,
    validation_parts,
)
from fedmerge.train.run import load_parts


class MergeConfig(ConfigModel):
    """The server's merge: a training-free initialisation, then (optionally) learned coefficients."""

    method: str = Field("ties", description="the training-free merge that initialises the coefficients")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (see `fedmerge merge`)")
    learn: LearnConfig = LearnConfig()
    rows: RowMode = Field("usage", description="item-memory rows: merged by catalogue usage, or by the method "
                                               "(see fedmerge.merge.rows)")

    @model_validator(mode="after")
    def _known_method(self) -> MergeConfig:
        method_params(self.method, self.params)  # raises a FedmergeError naming the bad method or parameter
        return self


class FederationConfig(ConfigModel):
    """One federated run: which domains, how many parties, the model, local training and the merge."""

    domains: list[str] = Field(default_factory=list, description="one or more registered domains, each once")
    parties_per_domain: int = Field(1, ge=1, description="parties each domain's users are split across (FedAvg inside)")
    rounds: int = Field(1, ge=1, description="merging rounds; round r > 1 starts from round r - 1's merged model")
    min_parties: int | None = Field(None, ge=1, description="parties that must reply per round (default: all)")
    seed: int = Field(0, description="seed of theta_0 (the seeded base) and of the parties' training")
    base: str | None = Field(None, description="base weights theta_0 (a safetensors file or checkpoint folder); "
                             "default: the seeded init of the model config")
    client_cpus: float = Field(1.0, gt=0.0, le=1024.0, description="CPUs per party: Ray resources, and its torch threads "
                               "in every backend")
    client_gpus: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per simulated party (fractions allowed)")
    evaluate_valid: bool = Field(True, description="parties evaluate every model on their valid split as well as "
                                 "on test (false: test only, half the evaluation time)")
    local_text_weight: bool = Field(True, description="textseq: each party sets the text weight of every model it "
                                    "evaluates on its own valid users (from train.text_weights), as after its own "
                                    "training (false: the weight the model arrives with)")
    timeout_minutes: float = Field(120.0, gt=0.0, description="how long the server waits for the parties of a round")
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if len(set(self.domains)) != len(self.domains):
            twice = sorted({d for d in self.domains if self.domains.count(d) > 1})
            raise FedmergeError(f"domain {twice[0]!r} is listed twice; give each domain once")
        if self.min_parties is not None and self.min_parties > self.n_parties:
            raise FedmergeError(f"min_parties = {self.min_parties} but the run has only {self.n_parties} parties "
                                f"({len(self.domains)} domains x {self.parties_per_domain}); lower min_parties")
        return self

    @property
    def n_parties(self) -> int:
        return len(self.domains) * self.parties_per_domain

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits every party evaluates every model on."""
        return ("valid", "test") if self.evaluate_valid else ("test",)


@dataclass(frozen=True)
class PartySpec:
    """Who party `party` is: shard `shard` of `shards` of domain `domain`'s users."""

    party: int
    domain: str
    shard: int
    shards: int


def party_specs(config: FederationConfig) -> list[PartySpec]:
    """Party ids 0..n-1, domain by domain."""
    n = config.parties_per_domain
    return [PartySpec(i * n + s, d, s, n) for i, d in enumerate(config.domains) for s in range(n)]


def party_data(spec: PartySpec, config: FederationConfig, quiet: bool = True, whole: Part | None = None) -> Part:
    """The party's private data: its domain, or its shard of the users (seeded, disjoint), with the item table.

    `whole` is the loaded domain, when the caller already has it (parties simulated in one process).
    """
    part = whole or load_parts([spec.domain], config.model, quiet=quiet)[0]
    if spec.shards == 1:
        return part
    if part.domain.n_users < spec.shards:
        raise FedmergeError(f"domain {spec.domain!r} has {part.domain.n_users} users, fewer than its "
                            f"{spec.shards} parties; lower parties_per_domain")
    order = np.random.default_rng(config.seed).permutation(part.domain.n_users)
    return Part(user_subset(part.domain, np.sort(order[spec.shard :: spec.shards])), part.features)


@dataclass
class TrainReply:
    """What a party sends after local training: weights, its public item table, aggregate facts."""

    domain: str
    weights: StateDict
    features: torch.Tensor
    metrics: dict[str, float]


def base_weights(config: FederationConfig, text_dim: int) -> StateDict:
    """theta_0: the seeded init of the model config (``config.base`` is read by the caller)."""
    return {k: v.detach().clone() for k, v in build_model(config.model, text_dim, config.seed).state_dict().items()}


@contextmanager
def party_threads(config: FederationConfig) -> Iterator[None]:
    """Run a party's work on ``client_cpus`` torch threads, in every backend (the same arithmetic, the same result)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.client_cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def party_train(part: Part, start: StateDict, config: FederationConfig, quiet: bool = True) -> TrainReply:
    """Fine-tune from `start` on the party's training split (the same loop as ``fedmerge train``)."""
    model = build_model(config.model, part.features.shape[1], config.seed)
    model.load_state_dict(start)
    began = time.perf_counter()
    with party_threads(config):
        result = fit(model, [part], config.train, quiet=quiet)
        model.load_state_dict(result.best_state)
        fit_text_weight(model, [part], config.train)
    trained = [h for h in result.history if "loss" in h]  # the epochs trained (epoch 0 is the start)
    metrics = {"users": float(part.domain.n_users), "n_items": float(part.domain.n_items),
               "epochs": float(len(trained)), "best_epoch": float(result.best_epoch),
               "best_valid_ndcg@10": float(result.best_score), **({"last_loss": float(trained[-1]["loss"])} if trained
                                                                 else {}),
               "train_seconds": float(result.train_seconds), "seconds": time.perf_counter() - began}
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainReply(part.domain.name, weights, part.features.cpu(), metrics)


def party_evaluate(part: Part, weights: StateDict, config: FederationConfig, splits: tuple[str, ...] | None = None,
                   sample: bool = False) -> dict[str, dict[str, float]]:
    """Aggregate metrics of `weights` on the party's private `splits` (default ``config.splits``): {split: metrics}.

    ``sample`` reads only the ``train.valid_users`` seeded users that chose the party's epoch
    (how candidate merges are scored); the reported rows always read every user. With
    ``local_text_weight`` a textseq model's text weight is first chosen on those sampled users;
    when they are every valid user, that pass is also the valid split's result. A textseq
    model's metrics include the text weight it was evaluated with.
    """
    if sample:
        part = validation_parts([part], config.train.valid_users, config.train.seed)[0]
    model = build_model(config.model, part.features.shape[1], config.seed)
    model.load_state_dict(weights)
    with party_threads(config):
        known = {}
        if config.local_text_weight:
            tried = text_weight_metrics(model, [part], config.train)
            scores = choose_text_weight(model, tried)
            if scores and reads_every_user(part, config.train.valid_users):
                known["valid"] = tried[max(scores, key=scores.get)][0]
        scorer = model_scorer(model, part.features)
        extra = {"text_weight": round(float(model.text_weight), 6)} if isinstance(model, TextSeqRec) else {}
        return {split: {k: float(v) for k, v in (known.get(split) or evaluate_domain(
                    scorer, part.domain, split, config.train.eval_batch_size)).items()} | extra
                for split in splits or config.splits}


def check_reply(reply: TrainReply, base: StateDict, party: str) -> None:
    """Reject a reply whose weights do not match theta_0's layout or are not finite (names the party)."""
    check_aligned(base, [reply.weights], [party])
    if reply.features.ndim != 2 or not torch.isfinite(reply.features).all():
        raise FedmergeError(f"{party} sent an item table of shape {tuple(reply.features.shape)} with non-finite "
                            "values or the wrong rank; it is rejected")


def average_parties(replies: list[TrainReply]) -> TrainReply:
    """FedAvg of one domain's parties, weighted by their number of users (integer buffers: the first's)."""
    if len(replies) == 1:
        return replies[0]
    users = torch.tensor([r.metrics["users"] for r in replies], dtype=torch.float64)
    share = (users / users.sum()).tolist()
    weights = {k: sum(s * r.weights[k] for s, r in zip(share, replies, strict=True)).to(v.dtype)
               if v.is_floating_point() else v for k, v in replies[0].weights.items()}
    metrics = {"users": float(users.sum()), "n_items": replies[0].metrics["n_items"], "parties": float(len(replies)),
               "train_seconds": max(r.metrics["train_seconds"] for r in replies)}
    return TrainReply(replies[0].domain, weights, replies[0].features, metrics)


@dataclass
class MergeOutcome:
    """The server's merge: the training-free initialisation, the learned merge and its coefficients."""

    initial: StateDict
    merged: StateDict
    coefficients: dict[str, Any]
    seconds: float
    teacher_bytes: int


Judge = Callable[[list[StateDict]], list[float]]
"""Scores candidate merged models by the parties' mean valid ndcg@10 over the domains (one number each)."""


def server_merge(base: StateDict, replies: list[TrainReply], model: ModelConfig, seed: int, merge: MergeConfig,
                 quiet: bool = True, judge: Judge | None = None) -> MergeOutcome:
    """Merge one model per domain: task vectors, the init method, then coefficients learned on pseudo-users.

    The replies' weights must match `base` (:func:`check_reply`, :func:`check_aligned`).

    ``seed`` seeds the skeleton models (their weights are always overwritten). With
    ``merge.learn.valid_candidates`` or ``valid_scales``, `judge` (the parties, on their valid
    split) scores the candidate coefficients and the best one is kept; its scores go into the
    coefficients.
    """
    started = time.perf_counter()
    names = [r.domain for r in replies]
    params = method_params(merge.method, merge.params)
    vectors = [task_vector(base, r.weights) for r in replies]
    prepared = prepare(merge.method, vectors, params)
    skeleton = build_model(model, replies[0].features.shape[1], seed)
    if merge.rows == "usage":
        usage = [skeleton.row_usage(r.features) for r in replies]
        prepared = usage_rows(prepared, vectors, {key: torch.stack([u[key] for u in usage]) for key in usage[0]})
    server = []
    if merge.learn.mode != "none":
        for reply in replies:
            teacher = build_model(model, reply.features.shape[1], seed)
            teacher.load_state_dict(reply.weights)
            server.append(server_domain(reply.domain, reply.features, teacher, merge.learn))
    result = learn_coefficients(skeleton, base, prepared, server, merge.learn, quiet=quiet)
    check_finite(merge.method, params, result.merged)
    selection = _choose(result, judge) if result.candidates else None
    coefficients = {"method": merge.method, "params": params.model_dump(), "rows": merge.rows,
                    "learn": merge.learn.model_dump(),
                    "domains": names, "groups": result.groups, "initial": prepared.weights,
                    "weights": result.weights.tolist(), "best_step": result.best_step, "selection": selection,
                    "log": result.log}
    return MergeOutcome(result.initial, result.merged, coefficients, time.perf_counter() - started,
                        sum(d.teacher.nbytes for d in server if d.teacher))


def _choose(result: LearnResult, judge: Judge | None) -> dict[str, Any]:
    """Keep the candidate with the best valid score (the earliest of equals) in `result`; what was scored."""
    if judge is None:
        raise FedmergeError("learn.valid_candidates / valid_scales need the parties to score the candidates on their "
                            "valid split, which only `fedmerge merge` and `fedmerge simulate` do; turn them off here")
    started = time.perf_counter()
    scores = judge([c.merged for c in result.candidates])
    best = result.candidates[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    result.best_step, result.weights, result.merged = best.step, best.weights, best.merged
    return {"criterion": "mean valid ndcg@10 over the domains", "steps": [c.step for c in result.candidates],
            "scales": [c.scale for c in result.candidates], "scores": [float(v) for v in scores],
            "chosen_step": best.step, "chosen_scale": best.scale, "seconds": round(time.perf_counter() - started, 2)}


def domain_rows(label: str, results: list[tuple[PartySpec, dict[str, dict[str, float]]]]) -> list[Row]:
    """Metric rows per domain and split from the parties' metrics (user-weighted means of their shards)."""
    rows = []
    for domain in dict.fromkeys(spec.domain for spec, _ in results):
        for split in results[0][1]:
            shards = [m[split] for spec, m in results if spec.domain == domain]
            users = sum(m["users"] for m in shards)
            merged = {k: sum(m[k] * m["users"] for m in shards) / max(users, 1.0) for k in shards[0] if k != "users"}
            rows.append(metric_row(label, domain, split, merged | {"users": int(users)}))
    return rows
