"""Woven adapters: roles and the schedule of the legs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fedmerge.config import load_config
from fedmerge.errors import FedmergeError
from fedmerge.models import build_model, load_parts
from fedmerge.models.llm import tiny_base
from fedmerge.protocol import FederationConfig, base_weights, party_leg
from fedmerge.text.tokens import minilm_folder
from fedmerge.train.legs import Carry, train_leg
from fedmerge.weaving import Leg, WeaveConfig, hybrid_name, schedule, weave


def test_one_source_alternates_target_and_source_from_the_configured_side() -> None:
    ticks = schedule(WeaveConfig(target="beauty", sources=["toys"], visits=2))
    assert ticks == [
        [Leg("beauty+toys", "beauty", 0, 0)],
        [Leg("beauty+toys", "toys", 0, 1)],
        [Leg("beauty+toys", "beauty", 1, 2)],
        [Leg("beauty+toys", "toys", 1, 3)],
    ]
    swapped = schedule(WeaveConfig(target="toys", sources=["beauty"], visits=1, first="source"))
    assert [leg.domain for tick in swapped for leg in tick] == ["beauty", "toys"]
    # the hybrid is named by the pair, whatever the roles: reused when they swap
    assert hybrid_name("toys", "beauty") == hybrid_name("beauty", "toys") == "beauty+toys"


def test_hybrids_of_several_sources_train_at_once_at_different_parties() -> None:
    config = WeaveConfig(target="beauty", sources=["toys", "sports"], visits=2)
    ticks = schedule(config)
    assert [[(leg.hybrid, leg.domain) for leg in tick] for tick in ticks] == [
        [("beauty+toys", "beauty")],
        [("beauty+toys", "toys"), ("beauty+sports", "beauty")],
        [("beauty+toys", "beauty"), ("beauty+sports", "sports")],
        [("beauty+toys", "toys"), ("beauty+sports", "beauty")],
        [("beauty+sports", "sports")],
    ]
    for tick in ticks:  # a party trains one leg at a time
        assert len({leg.domain for leg in tick}) == len(tick)
    for hybrid in ("beauty+toys", "beauty+sports"):  # every leg once, in order
        legs = [leg for tick in ticks for leg in tick if leg.hybrid == hybrid]
        assert [leg.index for leg in legs] == [0, 1, 2, 3]
        assert [leg.visit for leg in legs] == [0, 0, 1, 1]


def test_bad_roles_get_one_clear_error() -> None:
    with pytest.raises(FedmergeError, match="'beauty' is the target and also a source"):
        WeaveConfig(target="beauty", sources=["toys", "beauty"])
    with pytest.raises(FedmergeError, match="source 'toys' is listed twice"):
        WeaveConfig(target="beauty", sources=["toys", "toys"])
    with pytest.raises(ValidationError, match="visits"):
        WeaveConfig(target="beauty", sources=["toys"], visits=0)
    with pytest.raises(ValidationError, match="sources"):
        WeaveConfig(target="beauty", sources=[])


def test_weaving_routes_each_leg_to_its_party_and_equals_its_legs_in_order(
    tmp_path: Path, cache: Path
) -> None:
    base = tiny_base(tmp_path / "tiny", minilm_folder())
    config = load_config(
        "simulate-llm",
        [
            'domains=["synth-0", "synth-1"]',
            f"model.base={base}",
            "model.title_tokens=12",
            "model.prompt_tokens=96",
            "train.lr=5e-3",
        ],
        FederationConfig,
    )
    woven = WeaveConfig(target="synth-0", sources=["synth-1"], steps=2, visits=2, seed=3)
    parts = {d: load_parts([d], config.model, quiet=True)[0] for d in config.domains}
    start = base_weights(config, parts["synth-0"].features.shape[1])
    skeleton = build_model(config.model, parts["synth-0"].features.shape[1], config.seed)
    skeleton.load_merged(start)
    begin = skeleton.exchanged()
    seen: list[tuple[str, str, int]] = []

    def run_tick(requests: list[tuple[Leg, Carry]]) -> list[Carry]:
        seen.extend((leg.hybrid, leg.domain, leg.index) for leg, _ in requests)
        return [
            party_leg(parts[leg.domain], start, config, woven, leg, carry)
            for leg, carry in requests
        ]

    hybrids = weave(begin, woven, run_tick)
    assert seen == [
        ("synth-0+synth-1", "synth-0", 0),
        ("synth-0+synth-1", "synth-1", 1),
        ("synth-0+synth-1", "synth-0", 2),
        ("synth-0+synth-1", "synth-1", 3),
    ]
    # the same legs, trained in that order on one model
    carry = Carry(begin, {})
    for domain, visit in (("synth-0", 0), ("synth-1", 0), ("synth-0", 1), ("synth-1", 1)):
        carry, _ = train_leg(skeleton, parts[domain], config.train, carry, 2, 3, visit)
    hybrid = hybrids["synth-0+synth-1"]
    assert hybrid.step == carry.step == 8
    assert all(torch.equal(hybrid.weights[k], carry.weights[k]) for k in carry.weights)
    assert not all(torch.equal(hybrid.weights[k], begin[k]) for k in begin)
    with pytest.raises(FedmergeError, match="is for synth-1, not this party's domain synth-0"):
        party_leg(parts["synth-0"], start, config, woven, Leg("x", "synth-1", 0, 1), hybrid)
    private = config.model_copy(
        update={"privacy": config.privacy.model_copy(update={"mechanism": "update-dp"})}
    )
    with pytest.raises(FedmergeError, match="does not account a woven adapter's legs"):
        party_leg(parts["synth-0"], start, private, woven, Leg("x", "synth-0", 0, 0), hybrid)
