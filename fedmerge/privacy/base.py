"""The update hook: every party's update, and every server aggregate, passes a mechanism.

A :class:`Mechanism` is built from the ``privacy`` table for one side of the run. On a party it
may replace the gradient step of local training (:meth:`Mechanism.local_step`) and maps the
update to what is sent (:meth:`Mechanism.send`); on the server it may replace the merge by a
noised aggregate (:meth:`Mechanism.aggregate`). It also says which touches of a party's private
data its guarantee covers, so generic code switches the others off. A new mechanism is one
module of :mod:`fedmerge.privacy` with one :func:`register` line.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.models import StateDict
from fedmerge.privacy.accountant import Ledger
from fedmerge.privacy.config import PrivacyConfig


@dataclass(frozen=True)
class Spent:
    """Where a guarantee stands: (epsilon, delta) so far, and the noise multiplier z."""

    epsilon: float
    delta: float
    noise_multiplier: float


class PrivateSteps(Protocol):
    """Local training's private gradient steps (DP-SGD): batches and gradients."""

    def batches(self) -> Iterator[np.ndarray]:
        """One epoch's batches of record indices."""
        ...

    def gradient(
        self,
        losses: Callable[[np.ndarray], torch.Tensor],
        batch: np.ndarray,
        params: list[torch.nn.Parameter],
    ) -> None:
        """Set each parameter's ``.grad`` from the records `batch` (`losses`: their (B,) losses)."""
        ...


@dataclass(frozen=True)
class Switches:
    """Uses of a party's private data that a mechanism's guarantee does not cover (switched off)."""

    calibration: bool = False
    """The family's post-training calibration is not chosen on valid."""
    reports: bool = False
    """No valid metrics, no training metrics of private data, no valid choices for the merge."""


class Mechanism:
    """``none``: the update as computed, nothing spent, nothing switched off."""

    name: ClassVar[str] = "none"
    spends: ClassVar[bool] = False
    """Whether it spends an (epsilon, delta) budget."""
    central: ClassVar[bool] = False
    """Whether the server, not the party, releases the noised value (then it keeps the ledger).

    The server then merges nothing but that aggregate, and no party's own model is shown to the
    others."""
    switches: ClassVar[Switches] = Switches()
    hides_parties: ClassVar[bool] = False
    """Whether the server may see only each domain's aggregate, never one party's update."""
    per_record: ClassVar[bool] = False
    """Whether it clips each record's loss gradient (the family must give per-record losses)."""
    unit: ClassVar[str] = ""
    """What one protected record is (delta's N counts them)."""
    how: ClassVar[str] = ""
    """How the epsilon is counted."""

    def __init__(self, config: PrivacyConfig, rounds: int, seed: int) -> None:
        self.config, self.rounds, self.seed = config, rounds, seed

    def check(self, method: str, learn: str, rows: str, parties_per_domain: int) -> None:
        """Refuse a federation the mechanism cannot protect (the merge and the parties given)."""

    def local_step(
        self, ledger: Ledger, records: int, batch_size: int, epochs: int, generator: torch.Generator
    ) -> PrivateSteps | None:
        """Private gradient steps for this round's local training (None: plain training)."""
        return None

    def send(
        self, update: StateDict, ledger: Ledger, records: int, generator: torch.Generator
    ) -> StateDict:
        """What the party sends for `update` (this round's exchanged state - start)."""
        return dict(update)

    def aggregate(
        self, updates: Sequence[StateDict], ledger: Ledger, generator: torch.Generator
    ) -> StateDict:
        """The server's noised aggregate of the parties' updates (central mechanisms only)."""
        raise NotImplementedError

    def spent(self, ledger: Ledger, records: int) -> Spent | None:
        """Where the guarantee stands after the ledger's releases (None: nothing is spent)."""
        return None

    def spendable(self, ledger: Ledger, records: int, batch_size: int, epochs: int) -> None:
        """Refuse a round that would take the ledger past ``privacy.budget``."""


class BudgetExhausted(FedmergeError):
    """A party's next round would spend more than ``privacy.budget``: the run stops cleanly."""


MECHANISMS: dict[str, type[Mechanism]] = {"none": Mechanism}


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Make `cls` usable as ``privacy.mechanism = cls.name`` (a name is taken once)."""
    if cls.name in MECHANISMS:
        raise ValueError(f"privacy mechanism {cls.name!r} is already registered")
    MECHANISMS[cls.name] = cls
    return cls


def mechanism_class(name: str) -> type[Mechanism]:
    """The mechanism registered as `name`, or an error listing the known ones."""
    import fedmerge.privacy  # noqa: F401 - registers the mechanisms

    if name not in MECHANISMS:
        raise FedmergeError(
            f"privacy.mechanism = {name!r} is no privacy mechanism; use: {', '.join(MECHANISMS)}"
        )
    return MECHANISMS[name]


def build_mechanism(config: PrivacyConfig, rounds: int, seed: int) -> Mechanism:
    """The mechanism of `config` for a run of `rounds` rounds."""
    return mechanism_class(config.mechanism)(config, rounds, seed)


def noise_generator(config: PrivacyConfig, seed: int, *who: int) -> torch.Generator:
    """The generator of one release's noise: seeded by the run's seed and `who` (party, round).

    Distinct parties and rounds draw independent noise. With ``seeded_noise = false`` the seed
    comes from the operating system's entropy instead, so no one can recompute the noise.
    """
    if config.seeded_noise:
        return _seeded(repr((seed, *who)))
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def clip_update(update: StateDict, clip: float) -> tuple[StateDict, float]:
    """`update` scaled to L2 norm at most `clip` over all its tensors; and its norm before."""
    norm = l2_norm(list(update.values()))
    factor = clip_factor(norm, clip)
    return {k: v * factor for k, v in update.items()}, norm


def clip_factor(norm: float, clip: float) -> float:
    """The factor that brings a vector of L2 norm `norm` within `clip` (1: it is within).

    A hair below clip / norm, so that rounding in float32 never leaves a norm above `clip`.
    """
    return clip / norm * (1.0 - 1e-6) if norm > clip else 1.0


def l2_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of `tensors` taken as one vector (in float64); sparse ones count their values."""
    squares = [(t.coalesce().values() if t.is_sparse else t).double().pow(2).sum() for t in tensors]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def gaussian(update: StateDict, std: float, generator: torch.Generator) -> StateDict:
    """`update` plus independent N(0, std^2) noise on every entry (exactly `update` at std 0).

    Each tensor's noise comes from its own generator, seeded by `generator`'s seed and the
    tensor's name, so it does not depend on the order the tensors arrive in.
    """
    if std == 0.0:
        return dict(update)
    base = generator.initial_seed()
    return {
        k: v + std * torch.randn(v.shape, generator=_seeded(f"{base}/{k}"), dtype=v.dtype)
        for k, v in update.items()
    }


def _seeded(text: str) -> torch.Generator:
    """A generator seeded by the sha256 of `text` (its first 8 bytes)."""
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
