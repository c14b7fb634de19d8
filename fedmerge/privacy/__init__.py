"""Privacy mechanisms behind the update hook (:mod:`fedmerge.privacy.base`) and their accountant.

``none`` (the default), ``update-dp`` (a party clips its whole update and adds Gaussian noise),
``dpsgd`` (DP-SGD inside local training), ``central-dp`` (the server clips, averages and
noises), ``secagg`` (the server sees each domain's sum of its parties' updates only).
docs/privacy.md says what each one protects.
"""

from fedmerge.privacy import (  # noqa: F401 - register the mechanisms
    central_dp,
    dpsgd,
    secagg,
    update_dp,
)
from fedmerge.privacy.accountant import Ledger
from fedmerge.privacy.base import (
    BudgetExhausted,
    Mechanism,
    PrivateSteps,
    Spent,
    build_mechanism,
    noise_generator,
    register,
)
from fedmerge.privacy.config import PrivacyConfig

__all__ = [
    "BudgetExhausted",
    "Ledger",
    "Mechanism",
    "PrivacyConfig",
    "PrivateSteps",
    "Spent",
    "build_mechanism",
    "noise_generator",
    "register",
]
