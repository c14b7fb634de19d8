"""``dpsgd``: DP-SGD inside each party's local training (per-record clipping, Gaussian noise).

A *record* is one user: the party trains on one sequence per user (the loss covers every prefix
of it), so clipping each sequence's gradient to C bounds what one user changes, and the
guarantee is user-level. Each step samples every user independently with rate q = batch_size /
N (Poisson sampling, as the accountant assumes), sums the clipped per-user gradients, adds
N(0, (z C)^2) and divides by the expected batch size q N. The accountant composes the sampled
Gaussian steps of every round into one ledger per party. Early stopping and the calibration read
the valid split, which belongs to the same users, outside the accounting: both are switched off
(the last epoch is kept; the calibration keeps the value it arrived with).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from fedmerge.models import StateDict
from fedmerge.privacy.accountant import Ledger, calibrated_noise, epsilon_of, party_delta
from fedmerge.privacy.base import (
    BudgetExhausted,
    Mechanism,
    Spent,
    Switches,
    clip_factor,
    l2_norm,
    register,
)

UNIT = "users of the party (one training sequence each)"


class PoissonSteps:
    """One round's DP-SGD steps: Poisson-sampled batches, clipped per-record gradients, noise."""

    def __init__(
        self,
        sample_rate: float,
        steps_per_epoch: int,
        clip: float,
        noise: float,
        records: int,
        generator: torch.Generator,
    ) -> None:
        self.sample_rate, self.steps_per_epoch = sample_rate, steps_per_epoch
        self.clip, self.noise, self.records = clip, noise, records
        self.generator = generator
        self.sampler = np.random.default_rng(generator.initial_seed())
        self.taken = 0

    def batches(self) -> Iterator[np.ndarray]:
        """One epoch: ``steps_per_epoch`` batches, each holding every record with probability q."""
        for _ in range(self.steps_per_epoch):
            yield np.flatnonzero(self.sampler.random(self.records) < self.sample_rate)

    def gradient(
        self,
        losses: Callable[[np.ndarray], torch.Tensor],
        batch: np.ndarray,
        params: list[torch.nn.Parameter],
    ) -> None:
        """Set ``.grad``: (sum of per-record gradients clipped to C + N(0, (z C)^2)) / (q N).

        Each record is its own forward and backward pass: a backward pass through a batched graph
        costs a whole batch's, so per-record passes grow linearly with the batch, not
        quadratically. Sparse gradients (embeddings) stay sparse until summed.
        """
        total = [torch.zeros_like(p) for p in params]
        for record in batch:
            grads = torch.autograd.grad(losses(record[None])[0], params, allow_unused=True)
            norm = l2_norm([g for g in grads if g is not None])
            factor = clip_factor(norm, self.clip)
            for t, g in zip(total, grads, strict=True):
                if g is not None:
                    t.add_(g, alpha=factor)
        std = self.noise * self.clip if self.noise else 0.0
        expected = self.sample_rate * self.records
        for p, t in zip(params, total, strict=True):
            if std:
                t.add_(torch.randn(t.shape, generator=self.generator, dtype=t.dtype) * std)
            p.grad = t / expected
        self.taken += 1


@register
class DPSGD(Mechanism):
    """DP-SGD in local training (see the module docstring)."""

    name = "dpsgd"
    spends = True
    per_record = True
    unit = UNIT
    how = (
        "RDP accountant (opacus): Poisson-sampled Gaussian steps of clipped per-user "
        "gradients, every step of every round"
    )
    switches = Switches(calibration=True, reports=True)

    def plan(self, records: int, batch_size: int, epochs: int) -> tuple[float, int, float]:
        """(q, steps per epoch, z) for a party of `records` users."""
        q = min(1.0, batch_size / records)
        steps = max(1, math.ceil(1.0 / q))
        if self.config.noise_multiplier is not None:
            return q, steps, self.config.noise_multiplier
        assert self.config.epsilon is not None  # the config requires one of the two
        delta = party_delta(self.config.delta, records, UNIT)
        return (
            q,
            steps,
            calibrated_noise(self.config.epsilon, delta, q, steps * epochs * self.rounds),
        )

    def local_step(
        self,
        ledger: Ledger,
        records: int,
        batch_size: int,
        epochs: int,
        generator: torch.Generator,
    ) -> PoissonSteps:
        """The private steps of this round (the ledger spends them in :meth:`send`)."""
        q, steps, z = self.plan(records, batch_size, epochs)
        self._steps = PoissonSteps(q, steps, self.config.clip, z, records, generator)
        return self._steps

    def send(self, update: StateDict, ledger: Ledger, records: int, generator) -> StateDict:
        """The update as trained (post-processing); the round's steps are spent."""
        steps = self._steps
        ledger.spend(steps.noise, steps.sample_rate, steps.taken)
        return dict(update)

    def spendable(self, ledger: Ledger, records: int, batch_size: int, epochs: int) -> None:
        """Refuse a round whose steps would take the party past ``budget``."""
        budget = self.config.budget
        if budget is None:
            return
        q, steps, z = self.plan(records, batch_size, epochs)
        delta = party_delta(self.config.delta, records, UNIT)
        after = epsilon_of([*ledger.events, (z, q, steps * epochs)], delta)
        if after > budget:
            raise BudgetExhausted(
                f"round {ledger.rounds + 1} would spend epsilon {after:.3g} > privacy.budget = "
                f"{budget:g} (spent so far {ledger.epsilon(delta):.3g})"
            )

    def spent(self, ledger: Ledger, records: int) -> Spent:
        """Epsilon at delta after the party's steps so far."""
        delta = party_delta(self.config.delta, records, UNIT)
        z = ledger.events[-1][0] if ledger.events else float("nan")
        return Spent(
            ledger.epsilon(delta),
            delta,
            z,
        )
