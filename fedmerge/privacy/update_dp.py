"""``update-dp``: a party clips its whole update to L2 norm C and adds Gaussian noise, each round.

Output perturbation at the party, so the server and everyone after it see only the noised
update. Any change of the party's data (one user, or all of them) moves the clipped update
within a ball of radius C, so two releases differ by at most 2C: with noise std z * C the
accountant composes Gaussian mechanisms of multiplier z / 2, one per round, no sampling. Every
choice the party makes before sending (early stopping, the calibration on valid) shapes the
update and is covered; metrics of its private data are not, and are switched off.
"""

from __future__ import annotations

from fedmerge.models import StateDict
from fedmerge.privacy.accountant import Ledger, calibrated_noise, epsilon_of, party_delta
from fedmerge.privacy.base import (
    BudgetExhausted,
    Mechanism,
    Spent,
    Switches,
    clip_update,
    gaussian,
    register,
)

UNIT = "users of the party"


@register
class UpdateDP(Mechanism):
    """Clip + Gaussian noise on the party's update (see the module docstring)."""

    name = "update-dp"
    spends = True
    unit = UNIT
    how = (
        "RDP accountant (opacus): one Gaussian release of the clipped update per round, "
        "sensitivity 2C (noise multiplier z/2), no sampling"
    )
    switches = Switches(reports=True)

    def noise(self, records: int) -> float:
        """Z = noise std / C: given, or the least that keeps the run within ``epsilon``."""
        if self.config.noise_multiplier is not None:
            return self.config.noise_multiplier
        assert self.config.epsilon is not None  # the config requires one of the two
        delta = party_delta(self.config.delta, records, UNIT)
        return 2.0 * calibrated_noise(self.config.epsilon, delta, 1.0, self.rounds)

    def send(self, update: StateDict, ledger: Ledger, records: int, generator) -> StateDict:
        """The update clipped to ``clip`` plus N(0, (z C)^2) on every entry; one release spent."""
        z = self.noise(records)
        clipped, _ = clip_update(update, self.config.clip)
        ledger.spend(z / 2.0, 1.0, 1)
        return gaussian(clipped, z * self.config.clip if z else 0.0, generator)

    def spendable(self, ledger: Ledger, records: int, batch_size: int, epochs: int) -> None:
        """Refuse a round whose release would take the party past ``budget``."""
        budget = self.config.budget
        if budget is None:
            return
        delta = party_delta(self.config.delta, records, UNIT)
        after = epsilon_of([*ledger.events, (self.noise(records) / 2.0, 1.0, 1)], delta)
        if after > budget:
            raise BudgetExhausted(
                f"round {ledger.rounds + 1} would spend epsilon {after:.3g} > privacy.budget = "
                f"{budget:g} (spent so far {ledger.epsilon(delta):.3g})"
            )

    def spent(self, ledger: Ledger, records: int) -> Spent:
        """Epsilon at delta after the party's releases so far."""
        delta = party_delta(self.config.delta, records, UNIT)
        return Spent(
            ledger.epsilon(delta),
            delta,
            self.noise(records),
        )
