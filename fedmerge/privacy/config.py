"""The ``privacy`` table of a federation: which mechanism, and its (epsilon, delta) or noise."""

from __future__ import annotations

from pydantic import Field, model_validator

from fedmerge.config import ConfigModel
from fedmerge.errors import FedmergeError


class PrivacyConfig(ConfigModel):
    """What protects a party's data beyond keeping it local (``none``: nothing more).

    A mechanism that spends a budget takes either a target ``epsilon`` for the whole run, from
    which the noise is calibrated, or a ``noise_multiplier`` (then ``budget`` may cap what a party
    spends); see docs/privacy.md.
    """

    mechanism: str = Field(
        "none", description="none, dpsgd, update-dp, central-dp or secagg (docs/privacy.md)"
    )
    epsilon: float | None = Field(
        None, gt=0.0, description="target epsilon per party for the whole run (noise calibrated)"
    )
    noise_multiplier: float | None = Field(
        None, ge=0.0, description="Gaussian noise std / clip (instead of a target epsilon)"
    )
    delta: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="delta of the guarantee, at most 1/N for N protected records (default N^-1.1)",
    )
    clip: float = Field(
        1.0,
        gt=0.0,
        description="L2 bound C: of each record's gradient (dpsgd), of a party's update "
        "(update-dp, central-dp)",
    )
    budget: float | None = Field(
        None,
        gt=0.0,
        description="with noise_multiplier: the epsilon a party may spend; the run stops "
        "cleanly before a round would exceed it",
    )
    seeded_noise: bool = Field(
        True,
        description="noise drawn from the run's seed (reproducible simulation); false: from the "
        "operating system's entropy, as a deployment against a real adversary needs",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        from fedmerge.privacy.base import mechanism_class

        spends = mechanism_class(self.mechanism).spends
        if spends and self.epsilon is not None and self.noise_multiplier is not None:
            raise FedmergeError(
                f"privacy.epsilon = {self.epsilon} and privacy.noise_multiplier = "
                f"{self.noise_multiplier} are both given; give one (the noise is calibrated from "
                "a target epsilon)"
            )
        if spends and self.epsilon is None and self.noise_multiplier is None:
            raise FedmergeError(
                f"privacy.mechanism = {self.mechanism} needs privacy.epsilon (a target for the "
                "run) or privacy.noise_multiplier"
            )
        if self.budget is not None and self.noise_multiplier is None:
            raise FedmergeError(
                "privacy.budget caps the epsilon spent with a given privacy.noise_multiplier; with "
                "a target privacy.epsilon the run spends exactly that, so drop privacy.budget"
            )
        if not spends and any(
            v is not None for v in (self.epsilon, self.noise_multiplier, self.budget, self.delta)
        ):
            raise FedmergeError(
                f"privacy.mechanism = {self.mechanism} spends no (epsilon, delta) budget; drop "
                "privacy.epsilon / noise_multiplier / delta / budget or choose dpsgd, update-dp "
                "or central-dp"
            )
        return self
