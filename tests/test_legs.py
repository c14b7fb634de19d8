"""Training in legs: a state carried from party to party equals training in one place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.errors import FedmergeError
from fedmerge.models import build_model, load_parts
from fedmerge.train.batches import training_sequences
from fedmerge.train.legs import Carry, leg_batches, train_leg
from fedmerge.train.loop import trainable_parameters, warmup
from tests.test_train import tiny

LEGS = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (party, visit): A, B, A, B
STEPS = 3


def test_legs_carried_between_fresh_models_equal_one_optimiser_in_one_place(
    cache: object,
) -> None:
    config = tiny("train.warmup_steps=4", "model.dropout=0.1")
    parts = load_parts(["synth-0", "synth-1"], config.model, quiet=True)
    width = parts[0].features.shape[1]

    # in one place: one model, one AdamW, the legs' batches in order
    model = build_model(config.model, width, seed=0)
    start = {k: v.clone() for k, v in model.exchanged().items()}
    params = trainable_parameters(model, config.train.frozen)
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=0.0)
    step = 0
    for party, visit in LEGS:
        torch.manual_seed(int(np.random.SeedSequence([7, visit]).generate_state(1)[0]))
        model.train()
        for inputs, targets in leg_batches(
            parts[party], config.train, config.model.max_len, STEPS, 7, visit
        ):
            for group in optimizer.param_groups:
                group["lr"] = config.train.lr * warmup(config.train, step)
            loss = model.loss(parts[party].features, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    in_one_place = model.exchanged()

    # woven: a fresh model per leg (another seed: nothing but the carry goes on)
    carry = Carry(start, {})
    for party, visit in LEGS:
        fresh = build_model(config.model, width, seed=100 + party)
        carry, loss = train_leg(fresh, parts[party], config.train, carry, STEPS, 7, visit)
        assert np.isfinite(loss)
    assert carry.step == len(LEGS) * STEPS
    assert set(carry.weights) == set(in_one_place)
    assert all(torch.equal(carry.weights[k], in_one_place[k]) for k in in_one_place)
    assert not all(torch.equal(carry.weights[k], start[k]) for k in start)
    # the moments travel for every trained parameter, both of them
    assert len(carry.moments) == 2 * len(params)


def test_a_leg_reads_only_its_own_party_and_refuses_zero_steps_and_sgd(cache: object) -> None:
    config = tiny()
    parts = load_parts(["synth-0", "synth-1"], config.model, quiet=True)
    max_len = config.model.max_len
    batches = leg_batches(parts[0], config.train, max_len, 50, 0, 0)
    assert len(batches) == 50  # more steps than one pass: the passes go on
    own = {tuple(s[:-1].tolist()) for s in training_sequences(parts[0].domain, max_len)}
    assert all(tuple(row[row >= 0].tolist()) in own for inputs, _ in batches for row in inputs)
    again = leg_batches(parts[0], config.train, config.model.max_len, 50, 0, 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    other_visit = leg_batches(parts[0], config.train, config.model.max_len, 50, 0, 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other_visit, strict=True))
    model = build_model(config.model, parts[0].features.shape[1], seed=0)
    with pytest.raises(FedmergeError, match="a leg of 0 steps trains nothing"):
        train_leg(model, parts[0], config.train, Carry(model.exchanged(), {}), 0, 0, 0)
    sgd = tiny("train.optimizer=sgd").train
    with pytest.raises(FedmergeError, match="legs carry AdamW's moments between parties"):
        train_leg(model, parts[0], sgd, Carry(model.exchanged(), {}), 1, 0, 0)
