"""A party's privacy ledger: the Gaussian events it released, composed with an RDP accountant.

One ledger per party for the whole run (never a fresh one per round): the epsilon after round r
composes every round so far. The accountant is opacus's RDP accountant; a ledger is plain JSON
so a Flower ClientApp keeps it in its node state between rounds.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field

from fedmerge.errors import FedmergeError

# importing opacus configures the root logger (logging.basicConfig in opacus.utils.module_utils),
# which would print every library's log records, Flower's included: undo that
_handlers, _level = list(logging.root.handlers), logging.root.level
try:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier
finally:
    logging.root.handlers[:] = _handlers
    logging.root.setLevel(_level)


@dataclass
class Ledger:
    """Rounds trained so far and the Gaussian events released: (noise multiplier, rate, steps).

    The noise multiplier of an event is noise std / sensitivity, as the accountant reads it.
    """

    rounds: int = 0
    events: list[tuple[float, float, int]] = field(default_factory=list)

    def spend(self, noise: float, sample_rate: float, steps: int) -> None:
        """Record `steps` Gaussian releases of multiplier `noise`, each sampling `sample_rate`."""
        self.events.append((float(noise), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at `delta` (0 before any release, inf with no noise)."""
        return epsilon_of(self.events, delta)

    def to_json(self) -> str:
        """The ledger as a JSON string (a Flower node state keeps it)."""
        return json.dumps({"rounds": self.rounds, "events": self.events})

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        """The ledger :meth:`to_json` wrote."""
        data = json.loads(text)
        return cls(data["rounds"], [tuple(e) for e in data["events"]])


def epsilon_of(events: list[tuple[float, float, int]], delta: float) -> float:
    """The epsilon of composing `events` (RDP accountant, opacus's default orders) at `delta`."""
    if not events:
        return 0.0
    if any(noise == 0.0 for noise, _, _ in events):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = list(events)
    with warnings.catch_warnings():
        # "optimal order is the largest alpha": the bound holds; a larger order might tighten it
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def calibrated_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The least noise multiplier (to 1%) within `epsilon` at `delta` over the releases.

    `steps` releases, each sampling records at `sample_rate`.
    """
    try:
        with warnings.catch_warnings():
            # "optimal order is the largest alpha" comes from the search's small trial noises;
            # the chosen multiplier is the same with orders up to 1024 (checked at 8, 4, 1)
            warnings.simplefilter("ignore", UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                )
            )
    except ValueError as err:
        raise FedmergeError(
            f"no noise reaches privacy.epsilon = {epsilon} at delta = {delta:.3g} over {steps} "
            f"releases ({err}); raise privacy.epsilon or delta, or lower the rounds"
        ) from err


def default_delta(records: int) -> float:
    """N^-1.1 for N protected records: below 1/N, as a guarantee on N records must be."""
    return float(max(records, 1)) ** -1.1


def party_delta(delta: float | None, records: int, what: str) -> float:
    """``privacy.delta``, or the default, checked to be at most 1/N for N = `records` `what`."""
    if delta is None:
        return default_delta(records)
    if delta > 1.0 / max(records, 1):
        raise FedmergeError(
            f"privacy.delta = {delta:g} is above 1/N = {1.0 / records:.3g} for the N = {records} "
            f"{what} it protects; lower privacy.delta or leave it unset (N^-1.1)"
        )
    return delta
