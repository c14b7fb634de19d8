"""The federation's steps, written once as plain functions over small typed values.

A *party* holds one domain's private users (or one shard of them, when a domain is split
across several parties): it trains from the weights it receives and evaluates weights on its
private splits. The *server* averages the parties of one domain (FedAvg), merges the domains
(training-free initialisation, then learned coefficients on pseudo-users) and aggregates the
parties' metrics. :mod:`fedmerge.pipeline` calls these functions in one process; ``clients/``
and ``server/`` call the very same functions from Flower handlers. Between the two sides pass
only typed values: weights and configs to the parties; from them, each domain's public item
table (once, :class:`Description`), updates after the ``updates`` chain (:class:`TrainReply`)
and aggregate metrics (:data:`Evaluation`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, PrivateAttr, model_validator

from fedmerge.config import ConfigModel
from fedmerge.data.domain import user_subset
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.merge.server import MergeConfig
from fedmerge.merge.vectors import StateDict, check_aligned, combine
from fedmerge.models import (
    ModelConfig,
    Part,
    Recommender,
    build_model,
    default_model,
    family,
    load_parts,
)
from fedmerge.privacy import Ledger, Mechanism, PrivacyConfig, build_mechanism, noise_generator
from fedmerge.runs.results import Row, metric_row
from fedmerge.train.config import TrainConfig
from fedmerge.train.legs import Carry, train_leg
from fedmerge.train.loop import (
    calibrate,
    calibration_metrics,
    choose_calibration,
    fit,
    reads_every_user,
    resolve_device,
    validation_parts,
)
from fedmerge.train.private import fit_private, records
from fedmerge.weaving import Leg, WeaveConfig, WeaveSettings

PRIVATE_METRICS = ("best_epoch", "best_valid_ndcg@10", "last_loss")
"""Training metrics computed from a party's private data: not sent when its privacy mechanism
switches reports off."""


class FederationConfig(ConfigModel):
    """One federated run: the domains, how many parties, the model, local training, the merge."""

    domains: list[str] = Field(
        default_factory=list, description="one or more registered domains, each once"
    )
    parties_per_domain: int = Field(
        1, ge=1, description="parties each domain's users are split across (FedAvg inside)"
    )
    rounds: int = Field(
        1, ge=1, description="merging rounds; round r > 1 starts from round r - 1's merged model"
    )
    min_parties: int | None = Field(
        None, ge=1, description="parties that must reply per round (default: all)"
    )
    seed: int = Field(
        0, description="seed of theta_0 (the seeded base) and of the parties' training"
    )
    base: str | None = Field(
        None,
        description="base weights theta_0 (a safetensors file or checkpoint folder); "
        "default: the seeded init of the model config",
    )
    client_cpus: float = Field(
        1.0,
        gt=0.0,
        le=1024.0,
        description="CPUs per party: Ray resources, and its torch threads in every backend",
    )
    client_gpus: float = Field(
        0.0, ge=0.0, le=64.0, description="GPUs per simulated party (fractions allowed)"
    )
    evaluate_valid: bool = Field(
        True,
        description="parties evaluate every model on their valid split as well as "
        "on test (false: test only, half the evaluation time)",
    )
    local_calibration: bool = Field(
        True,
        description="each party calibrates every model it evaluates on its own "
        "valid users, as after its own training, when the model family has a calibration "
        "(false: the calibration the model arrives with)",
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig,
        description="what protects each party's data beyond keeping it local (docs/privacy.md)",
    )
    timeout_minutes: float = Field(
        120.0, gt=0.0, description="how long the server waits for the parties of a round"
    )
    target: str | None = Field(
        None,
        description="a woven run (WeaveRec): the domain the woven model is for; the run's "
        "domains are then the target and the sources",
    )
    sources: list[str] = Field(
        default_factory=list, description="a woven run's source domains: one hybrid adapter each"
    )
    weave: WeaveSettings = Field(
        default_factory=WeaveSettings, description="how a woven run's hybrids are woven"
    )
    model: ModelConfig = Field(
        default_factory=default_model, description="the model family and its settings"
    )
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    _switched_off: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if self.target is not None:
            roles = self.weaving()
            assert roles is not None
            if self.domains and self.domains != roles.domains:
                raise FedmergeError(
                    f"domains = {self.domains} but a woven run's domains are its target and "
                    f"sources, {roles.domains}; leave domains unset"
                )
            self.domains = roles.domains
            if self.base is not None:
                raise FedmergeError(
                    "a woven run starts from the model config's own base (each party rebuilds "
                    "it, nothing of it travels); leave base unset"
                )
            if self.parties_per_domain != 1 or self.privacy.mechanism != "none":
                raise FedmergeError(
                    "a woven run has one party per domain and no privacy mechanism yet; set "
                    "parties_per_domain = 1 and privacy.mechanism = none"
                )
        elif self.sources:
            raise FedmergeError(
                f"sources = {self.sources} without a target; set target (a woven run) or "
                "leave sources unset"
            )
        if len(set(self.domains)) != len(self.domains):
            twice = sorted({d for d in self.domains if self.domains.count(d) > 1})
            raise FedmergeError(f"domain {twice[0]!r} is listed twice; give each domain once")
        if self.min_parties is not None and self.min_parties > self.n_parties:
            raise FedmergeError(
                f"min_parties = {self.min_parties} but the run has only {self.n_parties} parties "
                f"({len(self.domains)} domains x {self.parties_per_domain}); lower min_parties"
            )
        mechanism = self.mechanism()
        learn = self.merge.learn
        mechanism.check(self.merge.method, learn.mode, self.merge.rows, self.parties_per_domain)
        if (
            mechanism.per_record
            and family(self.model.kind).record_losses is Recommender.record_losses
        ):
            raise FedmergeError(
                f"privacy.mechanism = {self.privacy.mechanism} clips each user's gradient, but "
                f"model family {self.model.kind!r} has no per-record loss (its loss couples the "
                "records of a batch, e.g. in-batch negatives); use update-dp or central-dp"
            )
        if mechanism.per_record and self.train.batches_per_epoch is not None:
            raise FedmergeError(
                f"privacy.mechanism = {self.privacy.mechanism} draws its own batches (Poisson "
                "sampling, counted by the accountant), so train.batches_per_epoch cannot cut an "
                "epoch; leave it unset and lower train.epochs instead"
            )
        if (mechanism.central or mechanism.hides_parties) and not family(
            self.model.kind
        ).linear_updates:
            raise FedmergeError(
                f"privacy.mechanism = {self.privacy.mechanism} sums the parties' updates before "
                f"the server sees them, but the updates of model family {self.model.kind!r} do "
                "not add up (a LoRA adapter's factors); use dpsgd or update-dp"
            )
        if mechanism.switches.reports:
            # reads of the parties' private valid data that the guarantee does not cover
            touches = {
                "evaluate_valid": self.evaluate_valid,
                "local_calibration": self.local_calibration,
                "merge.learn.valid_candidates": bool(learn.valid_candidates),
                "merge.learn.valid_scales": bool(learn.valid_scales),
            }
            self._switched_off = [key for key, on in touches.items() if on]
            self.evaluate_valid = self.local_calibration = False
            learn.valid_candidates, learn.valid_scales = 0, []
        return self

    def weaving(self) -> WeaveConfig | None:
        """The woven run's roles and legs (None: not a woven run)."""
        if self.target is None:
            return None
        if not self.sources:
            raise FedmergeError(
                f"target = {self.target!r} but no sources; a woven run needs at least one source "
                'domain: set sources, e.g. sources=["toys"]'
            )
        return WeaveConfig(target=self.target, sources=self.sources, **self.weave.model_dump())

    def mechanism(self) -> Mechanism:
        """The privacy mechanism of the run (``privacy.mechanism``)."""
        return build_mechanism(self.privacy, self.rounds, self.seed)

    @property
    def switched_off(self) -> list[str]:
        """Settings the privacy mechanism switched off when this config was read.

        They read the parties' private valid data outside the guarantee.
        """
        return list(self._switched_off)

    @property
    def n_parties(self) -> int:
        """How many parties the run has: ``parties_per_domain`` for each domain."""
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


def repliers(config: FederationConfig) -> list[PartySpec]:
    """The parties whose train replies the server reads.

    Every party; or, when the privacy mechanism hides the parties of a domain, the first party
    of each domain, whose reply stands for the domain's secure aggregate.
    """
    specs = party_specs(config)
    if not config.mechanism().hides_parties:
        return specs
    return [s for s in specs if s.shard == 0]


def party_data(
    spec: PartySpec, config: FederationConfig, quiet: bool = True, whole: Part | None = None
) -> Part:
    """The party's private data.

    Its domain, or its shard of the users (seeded, disjoint), with the item table.

    `whole` is the loaded domain, when the caller already has it (parties simulated in one process).
    """
    part = whole or load_parts([spec.domain], config.model, quiet=quiet)[0]
    if spec.shards == 1:
        return part
    if part.domain.n_users < spec.shards:
        raise FedmergeError(
            f"domain {spec.domain!r} has {part.domain.n_users} users, fewer than its "
            f"{spec.shards} parties; lower parties_per_domain"
        )
    order = np.random.default_rng(config.seed).permutation(part.domain.n_users)
    return Part(user_subset(part.domain, np.sort(order[spec.shard :: spec.shards])), part.features)


@dataclass
class Description:
    """A party's answer to ``query``: who it is, and its domain's public item table.

    Sent once per run.
    """

    party: int
    domain: str
    n_items: int
    table: torch.Tensor


@dataclass
class TrainReply:
    """What a party sends after local training.

    Its update (exchanged state - start) and aggregate facts.
    """

    domain: str
    update: StateDict
    metrics: dict[str, float]


@dataclass
class EvaluateRequest:
    """Models (exchanged states) for a party to evaluate on its private `splits`.

    ``sample``: see party_evaluate.
    """

    models: list[StateDict]
    splits: tuple[str, ...]
    sample: bool = False


Evaluation = dict[str, dict[str, float]]
"""A party's evaluation of one model: {split: {metric: value}}."""


def describe(spec: PartySpec, part: Part) -> Description:
    """The party's ``query`` answer."""
    return Description(spec.party, spec.domain, part.domain.n_items, part.features.cpu())


def base_weights(config: FederationConfig, width: int) -> StateDict:
    """theta_0: the model config's seeded init, in the family's merge space.

    ``config.base`` is read by the caller.
    """
    model = build_model(config.model, width, config.seed)
    return {k: v.detach().clone() for k, v in model.merge_space(model.exchanged()).items()}


@contextmanager
def party_threads(config: FederationConfig) -> Iterator[None]:
    """Run a party's work on ``client_cpus`` torch threads, in every backend.

    The same arithmetic, the same result.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.client_cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def party_train(
    part: Part,
    start: StateDict,
    config: FederationConfig,
    quiet: bool = True,
    ledger: Ledger | None = None,
    party: int = 0,
) -> TrainReply:
    """Fine-tune from `start` on the party's training split (the loop of ``fedmerge train``).

    `start` is the round's start in the family's merge space; the update is of the exchanged
    state, from the state `start` loads as.

    The reply carries the update after the privacy mechanism, not the weights. `ledger` is the
    party's privacy ledger for the whole run (kept by the caller between rounds; updated here),
    `party` its id (it seeds the party's noise).
    """
    mechanism, ledger = config.mechanism(), ledger if ledger is not None else Ledger()
    n = records(part, config.model.max_len)
    mechanism.spendable(ledger, n, config.train.batch_size, config.train.epochs)
    generator = noise_generator(config.privacy, config.seed, party, ledger.rounds)
    model = build_model(config.model, part.features.shape[1], config.seed)
    model.load_merged(start)
    begin = {k: v.detach().clone() for k, v in model.exchanged().items()}  # training moves them
    began = time.perf_counter()
    with party_threads(config):
        steps = mechanism.local_step(
            ledger, n, config.train.batch_size, config.train.epochs, generator
        )
        if steps is None:
            result = fit(model, [part], config.train, quiet=quiet)
        else:
            result = fit_private(model, part, config.train, steps)
        model.load_state_dict(result.best_state)
        if not mechanism.switches.calibration:
            calibrate(model, [part], config.train)
    # the epochs trained (epoch 0 is the start)
    trained = [h for h in result.history if "loss" in h]
    metrics = {
        "users": float(part.domain.n_users),
        "n_items": float(part.domain.n_items),
        "epochs": float(len(trained)),
        "best_epoch": float(result.best_epoch),
        "best_valid_ndcg@10": float(result.best_score),
        **({"last_loss": float(trained[-1]["loss"])} if trained else {}),
        "train_seconds": float(result.train_seconds),
        "seconds": time.perf_counter() - began,
    }
    if mechanism.switches.reports:
        metrics = {k: v for k, v in metrics.items() if k not in PRIVATE_METRICS}
    after = model.exchanged()
    update = {k: after[k].detach().cpu() - v for k, v in begin.items() if v.is_floating_point()}
    sent = mechanism.send(update, ledger, n, generator)
    ledger.rounds += 1
    spent = None if mechanism.central else mechanism.spent(ledger, n)
    if spent is not None:
        metrics |= {"epsilon": spent.epsilon, "delta": spent.delta, "noise": spent.noise_multiplier}
    return TrainReply(part.domain.name, sent, metrics)


def party_leg(
    part: Part,
    start: StateDict,
    config: FederationConfig,
    weave: WeaveConfig,
    leg: Leg,
    carry: Carry,
) -> Carry:
    """One leg of a woven adapter at this party: ``weave.steps`` steps from `carry`.

    `start` is the run's base in the family's merge space (the weights the adapter sits on);
    the carry after the leg goes back to the server. Refused under a privacy mechanism: a leg's
    steps are not accounted.
    """
    if config.privacy.mechanism != "none":
        raise FedmergeError(
            f"privacy.mechanism = {config.privacy.mechanism} does not account a woven adapter's "
            "legs; weave with privacy.mechanism = none"
        )
    if leg.domain != part.domain.name:
        raise FedmergeError(
            f"leg {leg.index} of {leg.hybrid} is for {leg.domain}, not this party's domain "
            f"{part.domain.name}"
        )
    model = build_model(config.model, part.features.shape[1], config.seed)
    model.load_merged(start)
    model.to(resolve_device(config.train.device))
    with party_threads(config):
        after, _ = train_leg(model, part, config.train, carry, weave.steps, weave.seed, leg.visit)
    return after


def party_evaluate(
    part: Part,
    weights: StateDict,
    config: FederationConfig,
    splits: tuple[str, ...] | None = None,
    sample: bool = False,
) -> Evaluation:
    """Aggregate metrics of `weights` on the party's private `splits`: {split: metrics}.

    `splits` defaults to ``config.splits``.

    ``sample`` reads only the ``train.valid_users`` seeded users that chose the party's epoch
    (how candidate merges are scored); the reported rows always read every user. With
    ``local_calibration`` a family's calibration is first chosen on those sampled users; when
    they are every valid user, that pass is also the valid split's result. The metrics include
    the family's facts (the calibrated value).
    """
    if sample:
        part = validation_parts([part], config.train.valid_users, config.train.seed)[0]
    model = build_model(config.model, part.features.shape[1], config.seed)
    model.load_merged(weights)
    model.to(resolve_device(config.train.device))
    with party_threads(config):
        known = {}
        if config.local_calibration:
            tried = calibration_metrics(model, [part], config.train)
            scores = choose_calibration(model, tried)
            if scores and reads_every_user(part, config.train.valid_users):
                known["valid"] = tried[max(scores, key=scores.__getitem__)][0]
        scorer = model_scorer(model, part.features)
        return {
            split: {
                k: float(v)
                for k, v in (
                    known.get(split)
                    or evaluate_domain(
                        scorer,
                        part.domain,
                        split,
                        config.train.eval_batch_size,
                        protocol=config.train.evaluation,
                    )
                ).items()
            }
            | model.facts()
            for split in splits or config.splits
        }


def check_reply(reply: TrainReply, start: StateDict, party: str) -> None:
    """Reject a reply whose update mismatches the floating tensors of `start` or is not finite.

    The error names the party.
    """
    check_aligned(
        {k: v for k, v in start.items() if v.is_floating_point()}, [reply.update], [party]
    )


def check_description(description: Description, party: str) -> None:
    """Reject an item table that is not a finite (n_items, width) matrix (names the party)."""
    table = description.table
    if (
        table.ndim != 2
        or len(table) != description.n_items
        or (table.is_floating_point() and not torch.isfinite(table).all())
    ):
        raise FedmergeError(
            f"{party} sent an item table of shape {tuple(table.shape)} for {description.n_items} "
            "items, with non-finite values or the wrong shape; it is rejected"
        )


def average_parties(replies: list[TrainReply]) -> TrainReply:
    """FedAvg of one domain's parties' updates, weighted by their number of users."""
    if len(replies) == 1:
        return replies[0]
    users = torch.tensor([r.metrics["users"] for r in replies], dtype=torch.float64)
    share = (users / users.sum()).tolist()
    update = {
        k: sum(s * r.update[k] for s, r in zip(share, replies, strict=True)).to(v.dtype)
        for k, v in replies[0].update.items()
    }
    metrics = {
        "users": float(users.sum()),
        "n_items": replies[0].metrics["n_items"],
        "parties": float(len(replies)),
        "train_seconds": max(r.metrics["train_seconds"] for r in replies),
    }
    return TrainReply(replies[0].domain, update, metrics)


def fine_tuned(start: StateDict, reply: TrainReply) -> StateDict:
    """The weights a reply stands for: `start` + its update."""
    return combine(start, [reply.update], [1.0])


def domain_rows(
    label: str, results: list[tuple[PartySpec, dict[str, dict[str, float]]]], protocol: str = "full"
) -> list[Row]:
    """Metric rows per domain and split: user-weighted means of the parties' shard metrics.

    Each row records `protocol`, how it was ranked (:meth:`fedmerge.evaluate.EvalProtocol.name`).
    """
    rows = []
    for domain in dict.fromkeys(spec.domain for spec, _ in results):
        for split in results[0][1]:
            shards = [m[split] for spec, m in results if spec.domain == domain]
            users = sum(m["users"] for m in shards)
            merged = {
                k: sum(m[k] * m["users"] for m in shards) / max(users, 1.0)
                for k in shards[0]
                if k != "users"
            }
            rows.append(metric_row(label, domain, split, merged | {"users": int(users)}, protocol))
    return rows
