"""Local training with private gradient steps (a mechanism's :class:`PrivateSteps`).

Fixed epochs, no validation while training (the last epoch is kept), one record per user: each
step reads the records the mechanism samples, one loss per record, and the mechanism sets the
gradient. The optimiser and schedule are the plain loop's.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from fedmerge.data.sequences import pad_right
from fedmerge.errors import FedmergeError
from fedmerge.models import Part, Recommender
from fedmerge.privacy import PrivateSteps
from fedmerge.train.batches import last_targets_only, training_sequences
from fedmerge.train.config import TrainConfig
from fedmerge.train.loop import FitResult, deterministic, optimiser, resolve_device, unfreeze


def records(part: Part, max_len: int) -> int:
    """How many records private training samples from: the users with a training sequence."""
    return len(training_sequences(part.domain, max_len))


@deterministic()
def fit_private(
    model: Recommender, part: Part, config: TrainConfig, steps: PrivateSteps
) -> FitResult:
    """Train `model` in place on `part` for ``config.epochs`` epochs of private `steps`.

    Returns the last epoch's weights (no epoch is chosen on validation) and a per-epoch log of the
    mean loss, which stays with the party.
    """
    device = resolve_device(config.device)
    model.to(device)
    features = part.features.to(device)
    torch.manual_seed(config.seed)
    sequences = training_sequences(part.domain, model.config.max_len)
    if not sequences:
        raise FedmergeError(
            "no user has two or more training items, so there is nothing to train on"
        )
    params, optimizer, scheduler = optimiser(model, config)

    def loss_of(batch: np.ndarray) -> torch.Tensor:
        seqs = [sequences[i] for i in batch]
        inputs = pad_right([q[:-1] for q in seqs], model.config.max_len)
        targets = pad_right([q[1:] for q in seqs], model.config.max_len)
        if config.targets == "last":
            targets = last_targets_only(targets)
        values = model.record_losses(features, inputs.to(device), targets.to(device))
        if not torch.isfinite(values).all():
            raise FedmergeError(
                "the training loss became non-finite; lower train.lr or check the item features "
                "for NaN"
            )
        losses.extend(values.tolist())
        return values

    losses: list[float] = []
    result = FitResult(copy.deepcopy(model.state_dict()), 0, float("nan"))
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    dense = [m.sparse for m in embeddings]
    for m in embeddings:  # a record's embedding gradient touches a few rows: keep it sparse
        m.sparse = True
    for epoch in range(1, config.epochs + 1):
        began, n_seqs = time.perf_counter(), 0
        losses.clear()
        model.train()
        for batch in steps.batches():
            optimizer.zero_grad(set_to_none=True)
            steps.gradient(loss_of, batch, params)
            optimizer.step()
            scheduler.step()
            n_seqs += len(batch)
        seconds = time.perf_counter() - began
        result.train_seconds += seconds
        result.history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": seconds,
                "sequences_per_second": n_seqs / seconds,
            }
        )
    for m, was in zip(embeddings, dense, strict=True):
        m.sparse = was
    result.best_state, result.best_epoch = copy.deepcopy(model.state_dict()), config.epochs
    result.stopped = f"{config.epochs} epochs done (private steps: no early stopping)"
    unfreeze(model)
    result.sequences_per_second = float(
        np.mean([h["sequences_per_second"] for h in result.history])
    )
    return result
