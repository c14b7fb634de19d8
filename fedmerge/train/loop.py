"""The training loop: AdamW (or SGD) with warm-up, early stopping on validation ndcg@10, resumable.

One loop serves a single domain and joint training over several (batches of all domains are
interleaved; each batch is scored against its own domain's items; the stopping criterion is
the mean validation ndcg@10 over the domains).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from fedmerge.data.domain import user_subset
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import calibration_variants, evaluate_domain, evaluate_variants, model_scorer
from fedmerge.models import Part, Recommender
from fedmerge.progress import progress_bar
from fedmerge.train.batches import last_targets_only, length_batches, training_sequences
from fedmerge.train.config import TrainConfig
from fedmerge.train.state import has_state, load_state, save_state


@dataclass
class FitResult:
    """What training produced: the best epoch's weights and the per-epoch log."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    sequences_per_second: float = 0.0
    stopped: str = ""


def validation_score(model: Recommender, parts: list[Part], config: TrainConfig) -> float:
    """Mean validation ndcg@10 over the parts (``train.evaluation``'s protocol)."""
    return float(
        np.mean(
            [
                evaluate_domain(
                    model_scorer(model, p.features),
                    p.domain,
                    "valid",
                    config.eval_batch_size,
                    protocol=config.evaluation,
                )["ndcg@10"]
                for p in parts
            ]
        )
    )


def reads_every_user(part: Part, users: int | None) -> bool:
    """Whether validation with ``train.valid_users`` = `users` reads `part` whole.

    See :func:`validation_parts`.
    """
    return users is None or part.domain.n_users <= users


def validation_parts(parts: list[Part], users: int | None, seed: int) -> list[Part]:
    """The parts that validation reads.

    Each domain cut to `users` seeded users (``train.valid_users``), or as is.
    """
    if users is None:
        return parts
    rng = np.random.default_rng(seed)
    return [
        p
        if reads_every_user(p, users)
        else Part(
            user_subset(p.domain, np.sort(rng.choice(p.domain.n_users, users, replace=False))),
            p.features,
        )
        for p in parts
    ]


def trainable_parameters(model: Recommender, frozen: list[str]) -> list[torch.nn.Parameter]:
    """The parameters that training updates: all but those named by ``train.frozen``.

    ``train.frozen`` holds names or name prefixes.

    A frozen parameter stops receiving gradients. A prefix that names no parameter is an error
    that lists the model's top-level parts.
    """

    def named(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    params = dict(model.named_parameters())
    for prefix in frozen:
        if not any(named(name, prefix) for name in params):
            parts = sorted({name.split(".")[0] for name in params})
            raise FedmergeError(
                f"train.frozen names {prefix!r}, which is no parameter of this model; "
                f"use names or prefixes such as {', '.join(parts)}"
            )
    for name, param in params.items():
        param.requires_grad_(
            model.tunable(name) and not any(named(name, prefix) for prefix in frozen)
        )
    trainable = [param for param in params.values() if param.requires_grad]
    if not trainable:
        raise FedmergeError(
            f"train.frozen = {frozen} freezes every parameter, so there is nothing to train"
        )
    return trainable


def unfreeze(model: Recommender) -> None:
    """Undo ``train.frozen``: every parameter the family trains requires gradients again."""
    for name, param in model.named_parameters():
        param.requires_grad_(model.tunable(name))


def optimiser(
    model: Recommender, config: TrainConfig
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The trained parameters, ``train.optimizer`` over them and its linear warm-up."""
    params = trainable_parameters(model, config.frozen)
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup(config, step))
    return params, optimizer, scheduler


def warmup(config: TrainConfig, step: int) -> float:
    """The learning-rate factor of optimiser step `step` (from 0): ``train.warmup_steps`` linear."""
    return min(1.0, (step + 1) / max(1, config.warmup_steps))


def train_step(
    model: Recommender,
    features: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    where: str,
) -> float:
    """One optimiser step on a batch (``train.targets`` applied); its loss.

    A non-finite loss is refused, naming `where` (e.g. "at epoch 3").
    """
    if config.targets == "last":
        targets = last_targets_only(targets)
    loss = model.loss(features, inputs.to(features.device), targets.to(features.device))
    if not torch.isfinite(loss):
        raise FedmergeError(
            f"the training loss became {loss.item()} {where}; "
            "lower train.lr or check the item features for NaN"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def resolve_device(name: str) -> torch.device:
    """The torch device `name` (``train.device``), or an error naming the key if it is unusable."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise FedmergeError(
            f"train.device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from err
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise FedmergeError(
            f"train.device is {name!r} but this torch sees no such device; set train.device=cpu"
        )
    return device


@contextmanager
def swapped(model: Recommender, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Inside the block the model's parameters hold `weights` (e.g. their moving average).

    None: unchanged.
    """
    if weights is None:
        yield
        return
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in weights}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def update_average(
    average: dict[str, torch.Tensor] | None, model: Recommender, decay: float
) -> None:
    """One step of the weights' exponential moving average (``train.ema``), in place.

    None: nothing.
    """
    if average is None:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            average[name].lerp_(param, 1.0 - decay)


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch kernels inside the block (the previous setting is restored after).

    Several CPU threads accumulate gradients (index and embedding backward) in a varying order
    unless deterministic kernels are asked for; with them, the same seed and data give the same
    weights and metrics whatever the thread count. Ops without a deterministic kernel (some CUDA
    ones) warn instead of failing.
    """
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@deterministic()
def fit(
    model: Recommender,
    parts: list[Part],
    config: TrainConfig,
    state_dir: Path | None = None,
    quiet: bool = False,
    holdout: list[Part] | None = None,
) -> FitResult:
    """Train `model` in place on `parts`; return the weights of the best validation epoch.

    Parameters
    ----------
    model : Recommender
        Starts from its current weights (theta_0 or ``--init``); moved to ``config.device``.
    parts : list[Part]
        One part per domain (several for joint training).
    config : TrainConfig
        Optimiser, schedule, stopping.
    state_dir : Path | None
        The folder that keeps the resumable trainer state after every epoch
        (:mod:`fedmerge.train.state`); if it holds one, training resumes from it.
    quiet : bool
        No progress bar.
    holdout : list[Part] | None
        Validate on these domains instead of the training ones: early stopping and the best
        epoch then follow zero-shot quality on domains training never sees (``fedmerge pretrain
        --holdout``).
    """
    device = resolve_device(config.device)
    model.to(device)
    features = [p.features.to(device) for p in parts]
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    sequences = [training_sequences(p.domain, model.config.max_len) for p in parts]
    parts = validation_parts(holdout or parts, config.valid_users, config.seed)
    if not any(sequences):
        raise FedmergeError(
            "no user has two or more training items, so there is nothing to train on"
        )
    _, optimizer, scheduler = optimiser(model, config)
    average = (
        None if config.ema is None else {n: p.detach().clone() for n, p in model.named_parameters()}
    )
    if state_dir is not None and has_state(state_dir):
        state = load_state(state_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.random.set_rng_state(state["torch_rng"])
        result, stale, start_epoch = (
            FitResult(**state["result"]),
            state["stale"],
            state["epoch"] + 1,
        )
        average = (
            {k: v.to(device) for k, v in state["average"].items()}
            if state["average"] is not None
            else None
        )
        best_trained = state["best_trained"]
    else:
        # The starting model is a candidate (epoch 0) unless start_candidate is off, but patience
        # counts against the best trained epoch: the first epochs may dip below a strong
        # text-similarity start and then pass it.
        start_score = validation_score(model, parts, config)
        result = FitResult(
            copy.deepcopy(model.state_dict()),
            0,
            start_score if config.start_candidate else float("-inf"),
        )
        result.history.append({"epoch": 0, "valid_ndcg@10": start_score})
        best_trained, stale, start_epoch = float("-inf"), 0, 1
    n_batches = sum(math.ceil(len(s) / config.batch_size) for s in sequences)
    n_batches = min(n_batches, config.batches_per_epoch or n_batches)
    with progress_bar(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  valid ndcg@10 {task.fields[valid]:.4f}"),
        TimeElapsedColumn(),
        quiet=quiet,
    ) as progress:
        task = progress.add_task(
            "train", total=n_batches, epoch=start_epoch, loss=float("nan"), valid=result.best_score
        )
        for epoch in range(start_epoch, config.epochs + 1):
            began, losses, n_seqs = time.perf_counter(), [], 0
            model.train()
            streams = [
                (k, batch)
                for k, s in enumerate(sequences)
                for batch in length_batches(s, config.batch_size, model.config.max_len, rng)
            ]
            progress.update(task, completed=0, epoch=epoch)
            for index in rng.permutation(len(streams))[: config.batches_per_epoch]:
                k, (inputs, targets) = streams[index]
                losses.append(
                    train_step(
                        model, features[k], inputs, targets, optimizer, config, f"at epoch {epoch}"
                    )
                )
                scheduler.step()
                update_average(average, model, config.ema or 0.0)
                n_seqs += len(inputs)
                progress.update(task, advance=1, loss=float(np.mean(losses[-50:])))
            seconds = time.perf_counter() - began
            result.train_seconds += seconds
            with swapped(model, average):
                score = validation_score(model, parts, config)
                if score > result.best_score:
                    result.best_state, result.best_epoch, result.best_score = (
                        copy.deepcopy(model.state_dict()),
                        epoch,
                        score,
                    )
            result.history.append(
                {
                    "epoch": epoch,
                    "loss": float(np.mean(losses)),
                    "valid_ndcg@10": score,
                    "seconds": seconds,
                    "sequences_per_second": n_seqs / seconds,
                }
            )
            progress.update(task, valid=score)
            best_trained, stale = (score, 0) if score > best_trained else (best_trained, stale + 1)
            if state_dir is not None:
                save_state(
                    state_dir,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng.bit_generator.state,
                        "torch_rng": torch.random.get_rng_state(),
                        "result": vars(result),
                        "stale": stale,
                        "best_trained": best_trained,
                        "epoch": epoch,
                        "average": average,
                    },
                )
            if stale >= config.patience:
                result.stopped = f"early stop: no better valid ndcg@10 for {stale} epochs"
                break
            if config.max_minutes is not None and result.train_seconds >= 60 * config.max_minutes:
                result.stopped = f"time limit of {config.max_minutes} minutes"
                break
    result.stopped = result.stopped or f"{config.epochs} epochs done"
    unfreeze(model)
    epochs = [h for h in result.history if "sequences_per_second" in h]
    result.sequences_per_second = (
        float(np.mean([h["sequences_per_second"] for h in epochs])) if epochs else 0.0
    )
    return result


def calibration_metrics(
    model: Recommender, parts: list[Part], config: TrainConfig
) -> dict[float, list[dict[str, float | int]]]:
    """Valid metrics of every value of the model's calibration on each part validation reads.

    The calibration is :meth:`Recommender.calibration`; each part is cut to ``train.valid_users``;
    all values are scored in one pass over the users. Empty when the family has no calibration. The
    model is not changed.
    """
    values = model.calibration()
    if not values:
        return {}
    per_part = [
        evaluate_variants(
            calibration_variants(model, p.features),
            len(values),
            p.domain,
            "valid",
            config.eval_batch_size,
            protocol=config.evaluation,
        )
        for p in validation_parts(parts, config.valid_users, config.seed)
    ]
    return {v: [metrics[i] for metrics in per_part] for i, v in enumerate(values)}


def choose_calibration(
    model: Recommender, tried: dict[float, list[dict[str, float | int]]]
) -> dict[float, float]:
    """Calibrate `model` with the value of `tried` with the best mean valid ndcg@10.

    `tried` is from :func:`calibration_metrics`; the earliest of equals wins. Returns every value's
    mean.
    """
    scores = {v: float(np.mean([m["ndcg@10"] for m in metrics])) for v, metrics in tried.items()}
    if scores:
        model.calibrate(max(scores, key=scores.__getitem__))
    return scores


def calibrate(model: Recommender, parts: list[Part], config: TrainConfig) -> dict[float, float]:
    """Set the model's calibration to the value with the best mean valid ndcg@10.

    The calibration is the model's post-training setting.

    A family may have a setting that is chosen on validation after training rather than
    trained (the weight of a fixed prior, say). All values are scored in one pass
    over the validation users. Returns the valid ndcg@10 of every value (empty: nothing to choose).
    """
    return choose_calibration(model, calibration_metrics(model, parts, config))
