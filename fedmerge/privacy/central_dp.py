"""``central-dp``: the server clips each party's update, averages, and adds Gaussian noise.

DP-FedAvg with fixed clipping: noise std z * C on the sum of the n clipped updates, i.e.
z * C / n on their mean. One party's presence changes the sum by at most C, so the accountant
composes one Gaussian release of multiplier z per round (every party takes part). The guarantee
is on what leaves the server (the merged model) and protects each party as a whole; the server
itself sees clean updates, so no party's own update is shown to the others. Only a linear merge
(the plain mean) can be noised this way. With few parties the noise is large: z * C / n per
coordinate against a mean update of norm at most C.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmerge.errors import FedmergeError
from fedmerge.models import StateDict
from fedmerge.privacy.accountant import Ledger, calibrated_noise, party_delta
from fedmerge.privacy.base import Mechanism, Spent, Switches, clip_update, gaussian, register

UNIT = "parties (each party's presence)"


@register
class CentralDP(Mechanism):
    """Clip, average and noise at the server (see the module docstring)."""

    name = "central-dp"
    spends = True
    unit = UNIT
    how = (
        "RDP accountant (opacus): one Gaussian release of the clipped sum per round, "
        "sensitivity C, every party in every round"
    )
    central = True
    switches = Switches(reports=True)

    def check(self, method: str, learn: str, rows: str, parties_per_domain: int) -> None:
        """Refuse a merge other than the plain mean of the updates, and a budget cap."""
        if self.config.budget is not None:
            raise FedmergeError(
                "privacy.budget caps what a party spends on its own releases; under central-dp "
                "the server releases, so give privacy.epsilon (the run's target) instead"
            )
        if (method, learn, rows) != ("average", "none", "method"):
            raise FedmergeError(
                "privacy.mechanism = central-dp noises the plain mean of the parties' updates, so "
                "the merge must be that mean; set merge.method=average merge.learn.mode=none "
                "merge.rows=method"
            )

    def noise(self, parties: int) -> float:
        """Z = noise std / C: given, or the least that keeps the run within ``epsilon``."""
        if self.config.noise_multiplier is not None:
            return self.config.noise_multiplier
        assert self.config.epsilon is not None  # the config requires one of the two
        delta = party_delta(self.config.delta, parties, UNIT)
        return calibrated_noise(self.config.epsilon, delta, 1.0, self.rounds)

    def aggregate(self, updates: Sequence[StateDict], ledger: Ledger, generator) -> StateDict:
        """(sum of the clipped updates + N(0, (z C)^2)) / n; one release spent."""
        n, z = len(updates), self.noise(len(updates))
        clipped = [clip_update(u, self.config.clip)[0] for u in updates]
        total = {k: torch.stack([c[k] for c in clipped]).sum(0) for k in clipped[0]}
        ledger.spend(z, 1.0, 1)
        noised = gaussian(total, z * self.config.clip if z else 0.0, generator)
        return {k: v / n for k, v in noised.items()}

    def spent(self, ledger: Ledger, records: int) -> Spent:
        """Epsilon at delta after the server's releases so far; `records` = the parties."""
        delta = party_delta(self.config.delta, records, UNIT)
        return Spent(
            ledger.epsilon(delta),
            delta,
            self.noise(records),
        )
