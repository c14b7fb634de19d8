"""Training in legs: a few optimiser steps at one party, from a training state that travels.

A woven adapter (WeaveRec in a federation) trains k steps at one party, then k at another, and so
on, routed by the server. What travels from leg to leg is the :class:`Carry`: the exchanged
weights, AdamW's two moments of every trained parameter (so the optimiser goes on as if it had
never moved) and the number of steps taken so far (which sets the learning-rate warm-up). A leg's
batches are a seeded function of its party's data, the weaving seed and the visit number, so the
whole schedule is reproducible: training the same legs in one process, with one optimiser, gives
the same weights (``tests/test_legs.py``).

The moments are as private as the weights: they are running means of the gradients on each
party's data, and they cross to the server and the next party with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.models import Part, Recommender, StateDict
from fedmerge.train.batches import length_batches, training_sequences
from fedmerge.train.config import TrainConfig
from fedmerge.train.loop import train_step, trainable_parameters, unfreeze, warmup

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Carry:
    """The training state that travels between legs.

    ``weights`` is the model's exchanged state, ``moments`` AdamW's ``exp_avg`` and
    ``exp_avg_sq`` of each trained parameter (keys ``NAME.exp_avg`` / ``NAME.exp_avg_sq``; empty
    before the first step, or to start a fresh optimiser) and ``step`` the optimiser steps taken
    so far (the learning-rate warm-up follows it).
    """

    weights: StateDict
    moments: StateDict
    step: int = 0


def leg_batches(
    part: Part, config: TrainConfig, max_len: int, steps: int, seed: int, visit: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The `steps` batches of a party's leg: seeded by the weaving seed and the visit number.

    Length-bucketed shuffled batches of the party's training sequences (:func:`length_batches`),
    as many passes as `steps` need.
    """
    sequences = training_sequences(part.domain, max_len)
    if not sequences:
        raise FedmergeError(
            f"domain {part.domain.name!r} has no user with two or more training items, so a leg "
            "has nothing to train on"
        )
    rng = np.random.default_rng([seed, visit])
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(batches) < steps:
        batches += length_batches(sequences, config.batch_size, max_len, rng)
    return batches[:steps]


def train_leg(
    model: Recommender,
    part: Part,
    config: TrainConfig,
    carry: Carry,
    steps: int,
    seed: int,
    visit: int,
) -> tuple[Carry, float]:
    """`steps` AdamW steps of `model` on `part` from `carry`; the carry after them, mean loss.

    `model` is overwritten with ``carry.weights``; it trains in place on the device it is on.
    The learning rate follows ``train.lr`` with its linear warm-up over the run's steps
    (``carry.step`` taken before).
    """
    if steps < 1:
        raise FedmergeError(f"a leg of {steps} steps trains nothing; give at least 1 step")
    if config.optimizer != "adamw":
        raise FedmergeError(
            f"train.optimizer = {config.optimizer!r}: legs carry AdamW's moments between "
            'parties; set train.optimizer = "adamw" for woven and FedAvg-trained adapters'
        )
    device = next(model.parameters()).device
    model.load_exchanged({k: v.to(device) for k, v in carry.weights.items()})
    params = trainable_parameters(model, config.frozen)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if carry.moments:  # none: a fresh optimiser (the learning rate still follows carry.step)
        for name, param in zip(names, params, strict=True):
            optimizer.state[param] = {
                "step": torch.tensor(float(carry.step)),
                **{m: carry.moments[f"{name}.{m}"].to(device).clone() for m in MOMENTS},
            }
    features = part.features.to(device)
    torch.manual_seed(int(np.random.SeedSequence([seed, visit]).generate_state(1)[0]))
    losses = []
    model.train()
    for offset, (inputs, targets) in enumerate(
        leg_batches(part, config, model.config.max_len, steps, seed, visit)
    ):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup(config, carry.step + offset)
        where = f"in a leg on {part.domain.name}"
        losses.append(train_step(model, features, inputs, targets, optimizer, config, where))
    unfreeze(model)
    model.eval()
    moments = {
        f"{name}.{m}": optimizer.state[param][m].detach().cpu().clone()
        for name, param in zip(names, params, strict=True)
        for m in MOMENTS
    }
    weights = {k: v.cpu() for k, v in model.exchanged().items()}
    return Carry(weights, moments, carry.step + steps), float(np.mean(losses))
