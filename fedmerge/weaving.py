"""Woven adapters (WeaveRec in a federation): roles, and the schedule of the legs.

WeaveRec merges a target-only adapter with one *hybrid* adapter per source domain, each trained
on target and source data together. No party may see another's data, so a hybrid is woven: it
starts from the base, trains ``steps`` optimiser steps at the target party, then ``steps`` at
the source party, and so on, ``visits`` legs at each (equal steps on both sides by default, as
WeaveRec's equal mix), routed by the server, which only sees the adapter and its optimiser state
(:mod:`fedmerge.train.legs`). A hybrid is named by its unordered pair {target, source}; which
side trains first is ``first``: with ``first = "pair"`` the order depends on the pair alone, so
one hybrid serves both roles (``reuse`` keeps it).

The schedule packs every hybrid's legs into *ticks*: in one tick a party trains at most one leg,
and each hybrid's legs keep their order, so hybrids of different pairs train at the same time
at different parties. The packing changes only the wall time, never a hybrid's result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from fedmerge.config import ConfigModel
from fedmerge.errors import FedmergeError
from fedmerge.models import StateDict
from fedmerge.train.legs import Carry


class WeaveSettings(ConfigModel):
    """How hybrids are woven (``[weave]`` of a federation config)."""

    steps: int = Field(20, ge=1, description="optimiser steps of one leg at one party")
    visits: int = Field(2, ge=1, description="legs of each hybrid at each of its two parties")
    first: Literal["target", "source", "pair"] = Field(
        "target",
        description="which party of a pair trains a hybrid's first leg: the target's, the "
        "source's, or the pair's first domain by name (the same hybrid whatever the roles)",
    )
    seed: int = Field(0, description="seed of the weaving order: each leg's batches")
    reuse: bool = Field(
        False,
        description="keep each woven hybrid in the server's cache ($FEDMERGE_DATA/hybrids) and "
        "reuse one woven with the same pair, leg order, settings and item tables (e.g. when the "
        "roles swap with first = pair); the key does not cover the parties' private data",
    )


class WeaveConfig(WeaveSettings):
    """Roles and legs of a woven run."""

    target: str = Field(description="the domain the woven model is for")
    sources: list[str] = Field(
        min_length=1, description="the source domains: one hybrid adapter each"
    )

    @model_validator(mode="after")
    def _roles(self) -> WeaveConfig:
        if self.target in self.sources:
            raise FedmergeError(
                f"{self.target!r} is the target and also a source; a hybrid weaves the target "
                "with another domain: remove it from sources"
            )
        if len(set(self.sources)) != len(self.sources):
            twice = sorted({s for s in self.sources if self.sources.count(s) > 1})
            raise FedmergeError(f"source {twice[0]!r} is listed twice; give each source once")
        return self

    @property
    def domains(self) -> list[str]:
        """The target, then the sources."""
        return [self.target, *self.sources]


def hybrid_name(first: str, second: str) -> str:
    """The name of the hybrid of a pair of domains, whatever their roles: ``a+b``, sorted."""
    return "+".join(sorted((first, second)))


@dataclass(frozen=True)
class Leg:
    """One leg: `steps` steps of `hybrid` at `domain`, the domain's `visit`-th (from 0)."""

    hybrid: str
    domain: str
    visit: int
    index: int
    """The leg's place in its hybrid's order (from 0)."""


def hybrid_legs(config: WeaveConfig, source: str) -> list[Leg]:
    """The legs of the hybrid of the target and `source`, in order, alternating the two."""
    pair = {
        "target": [config.target, source],
        "source": [source, config.target],
        "pair": sorted([config.target, source]),
    }[config.first]
    name = hybrid_name(config.target, source)
    return [Leg(name, pair[i % 2], i // 2, i) for i in range(2 * config.visits)]


def schedule(config: WeaveConfig) -> list[list[Leg]]:
    """Every hybrid's legs packed into ticks (see the module docstring).

    In each tick, hybrids in the order of ``sources`` take their next leg when its party is free.
    """
    queues = [hybrid_legs(config, source) for source in config.sources]
    ticks: list[list[Leg]] = []
    while any(queues):
        busy: set[str] = set()
        tick = []
        for queue in queues:
            if queue and queue[0].domain not in busy:
                busy.add(queue[0].domain)
                tick.append(queue.pop(0))
        ticks.append(tick)
    return ticks


LegRunner = Callable[[list[tuple[Leg, Carry]]], list[Carry]]
"""Trains one tick's legs, each at its domain's party from its carry; their carries after."""


def weave(start: StateDict, config: WeaveConfig, run_tick: LegRunner) -> dict[str, Carry]:
    """Every hybrid of `config`, woven from the exchanged state `start`: {hybrid name: carry}.

    Each tick of :func:`schedule` goes to `run_tick` at once (its legs are at different
    parties); a hybrid's carry goes from each of its legs to the next.
    """
    carries = {
        hybrid_name(config.target, source): Carry(dict(start), {}) for source in config.sources
    }
    for tick in schedule(config):
        after = run_tick([(leg, carries[leg.hybrid]) for leg in tick])
        if len(after) != len(tick):
            raise FedmergeError(
                f"a weaving tick of {len(tick)} legs came back with {len(after)} results"
            )
        for leg, carry in zip(tick, after, strict=True):
            carries[leg.hybrid] = carry
    return carries
