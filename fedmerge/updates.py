"""What a party sends: its update (exchanged state - start), through a chain of update mechanisms.

Every party's update passes :func:`send_update` before it leaves the party; each mechanism of
``FederationConfig.updates`` maps the update to what is sent, in order. ``identity`` sends the
update as computed; clipping, noise and masking for secure aggregation plug in here, so no
other code changes when one is added (:func:`register_mechanism`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedmerge.errors import FedmergeError
from fedmerge.models import StateDict

UpdateMechanism = Callable[[StateDict], StateDict]
"""Maps a party's update (floating tensors, keyed like the exchanged state) to what it sends."""

MECHANISMS: dict[str, UpdateMechanism] = {"identity": dict}


def register_mechanism(name: str, mechanism: UpdateMechanism) -> None:
    """Make `mechanism` usable in ``updates`` under `name` (a name is taken once)."""
    if name in MECHANISMS:
        raise ValueError(f"update mechanism {name!r} is already registered")
    MECHANISMS[name] = mechanism


def check_mechanisms(names: list[str]) -> None:
    """Refuse a chain naming an unknown mechanism (named, with the known ones)."""
    for name in names:
        if name not in MECHANISMS:
            raise FedmergeError(
                f"updates names {name!r}, which is no update mechanism; use: "
                f"{', '.join(MECHANISMS)}"
            )


def send_update(update: StateDict, names: list[str]) -> StateDict:
    """`update` after each mechanism of `names` in turn (an empty chain sends it as computed)."""
    for name in names:
        update = MECHANISMS[name](update)
    return update
