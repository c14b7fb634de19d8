"""Woven adapters: roles and the schedule of the legs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fedmerge.config import load_config
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from fedmerge.merge.vectors import task_vector
from fedmerge.models import build_model, family, load_parts
from fedmerge.models.llm import LlmLora, tiny_base
from fedmerge.pipeline import InProcess, simulate
from fedmerge.protocol import (
    Description,
    Evaluation,
    FederationConfig,
    TrainReply,
    base_weights,
    party_leg,
    party_specs,
    party_threads,
)
from fedmerge.text.tokens import minilm_folder
from fedmerge.train.legs import Carry, train_leg
from fedmerge.weaving import Leg, WeaveConfig, hybrid_name, schedule, weave
from tests.test_llm import tiny_llm


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
            *tiny_llm(base),
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
    # the same legs, trained in that order on one model, on the parties' threads (client_cpus)
    carry = Carry(begin, {})
    with party_threads(config):
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


def test_a_woven_run_fuses_the_target_only_adapter_and_the_hybrid_with_equal_weights(
    tmp_path: Path, cache: Path
) -> None:
    base = tiny_base(tmp_path / "tiny", minilm_folder())
    config = load_config(
        "weaverec",
        [
            "target=synth-0",
            'sources=["synth-1"]',
            *tiny_llm(base),
            "train.lr=5e-3",
            "train.batches_per_epoch=3",
            "train.valid_users=8",
            "train.evaluation.users=8",
            "weave.steps=2",
        ],
        FederationConfig,
    )
    assert config.domains == ["synth-0", "synth-1"]
    simulate(config, InProcess(config), tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {r["domain"] for r in rows} == {"synth-0"}  # the target evaluates, nobody else
    assert [r["model"] for r in rows] == [
        "theta_0",
        "target-only (synth-0)",
        "source-only (synth-1)",
        "naive merge (target-only + source-only)",
        "fedavg (all parties)",
        "hybrid synth-0+synth-1",
        "woven merge (average)",
    ]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"


def test_a_woven_run_refuses_bad_roles(tmp_path: Path) -> None:
    with pytest.raises(FedmergeError, match="but no sources"):
        load_config("weaverec", ["target=synth-0", "sources=[]"], FederationConfig)
    with pytest.raises(FedmergeError, match="'synth-0' is the target and also a source"):
        load_config("weaverec", ["target=synth-0", 'sources=["synth-0"]'], FederationConfig)
    with pytest.raises(FedmergeError, match="without a target"):
        load_config("simulate", ['sources=["synth-0"]'], FederationConfig)
    with pytest.raises(FedmergeError, match="a woven run's domains are its target and sources"):
        load_config("weaverec", ['domains=["synth-3"]'], FederationConfig)
    with pytest.raises(FedmergeError, match="'weave.visits' must be greater than or equal to 1"):
        load_config("weaverec", ["weave.visits=0"], FederationConfig)
    with pytest.raises(FedmergeError, match="'weave.steps' must be greater than or equal to 1"):
        load_config("weaverec", ["weave.steps=0"], FederationConfig)
    with pytest.raises(FedmergeError, match="leave base unset"):
        load_config("weaverec", ["base=theta.safetensors"], FederationConfig)
    unknown = load_config("weaverec", ["target=nosuch"], FederationConfig)
    with pytest.raises(FedmergeError, match="nosuch"):
        simulate(unknown, InProcess(unknown), tmp_path / "run")
    assert not list(tmp_path.iterdir())  # nothing half-written


class Scripted:
    """A backend whose parties return known adapters, to check what the server makes of them."""

    def __init__(self, config: FederationConfig, model: LlmLora) -> None:
        self.specs, self.config, self.model = party_specs(config), config, model
        self.generator = torch.Generator().manual_seed(0)
        self.last: dict[str, dict[str, torch.Tensor]] = {}
        self.models: dict[str, dict[str, torch.Tensor]] = {}

    def adapter(self) -> dict[str, torch.Tensor]:
        return {
            k: torch.randn(v.shape, generator=self.generator) * 0.1
            for k, v in self.model.exchanged().items()
        }

    def describe(self, log: object) -> dict[int, Description | Exception]:
        return {
            s.party: Description(s.party, s.domain, 200, family("llm-lora").catalogue(
                synthetic_domain(s.domain), self.config.model
            ))
            for s in self.specs
        }  # fmt: skip

    def train(self, start: object) -> dict[int, TrainReply | Exception]:
        begin = self.model.exchanged()
        return {
            s.party: TrainReply(
                s.domain,
                {k: v - begin[k] for k, v in self.adapter().items()},
                {"users": 100.0 * (s.party + 1)},
            )
            for s in self.specs
        }

    def legs(self, start: object, requests: list[tuple[Leg, Carry]]) -> list[Carry]:
        out = []
        for leg, carry in requests:
            self.last[leg.hybrid + leg.domain] = weights = self.adapter()
            out.append(Carry(weights, {}, carry.step + 1))
        return out

    def evaluate(
        self,
        models: dict[str, dict[str, torch.Tensor]],
        splits: object = None,
        sample: bool = False,
        domains: set[str] | None = None,
    ) -> dict[int, dict[str, Evaluation] | Exception]:
        self.models = models
        metrics = {"test": {"users": 8.0, "ndcg@10": 0.1, "recall@10": 0.2}}
        return {s.party: dict.fromkeys(models, metrics) for s in self.specs if s.domain in domains}


def test_the_server_fuses_delta_w_with_equal_weights_and_fedavg_weighs_by_users(
    tmp_path: Path, cache: Path
) -> None:
    base = tiny_base(tmp_path / "tiny", minilm_folder())
    config = load_config(
        "weaverec",
        [
            "target=synth-0",
            'sources=["synth-1"]',
            *tiny_llm(base),
        ],
        FederationConfig,
    )
    model = build_model(config.model, 12, config.seed)
    scripted = Scripted(config, model)
    simulate(config, scripted, tmp_path / "run")  # type: ignore[arg-type]
    theta = scripted.models["theta_0"]
    delta = {name: task_vector(theta, w) for name, w in scripted.models.items()}
    target, source = delta["target-only (synth-0)"], delta["source-only (synth-1)"]
    hybrid = delta["hybrid synth-0+synth-1"]
    # the woven merge: the base plus the mean Delta W of the target-only adapter and the hybrid
    for key in theta:
        woven = delta["woven merge (average)"][key]
        assert torch.allclose(woven, (target[key] + hybrid[key]) / 2, atol=1e-6)
        naive = delta["naive merge (target-only + source-only)"][key]
        assert torch.allclose(naive, (target[key] + source[key]) / 2, atol=1e-6)
    # the hybrid is its last leg's adapter (at the source: 2 visits, target first)
    last = model.merge_space(scripted.last["synth-0+synth-1synth-1"])
    assert all(torch.allclose(last[k], scripted.models["hybrid synth-0+synth-1"][k]) for k in last)
    # FedAvg: the last round's legs weighed by the parties' users (100 and 200)
    mean = {
        k: (scripted.last["fedavgsynth-0"][k] + 2 * scripted.last["fedavgsynth-1"][k]) / 3
        for k in scripted.last["fedavgsynth-0"]
    }
    fedavg = model.merge_space(mean)
    reported = scripted.models["fedavg (all parties)"]
    assert all(torch.allclose(fedavg[k], reported[k], atol=1e-6) for k in fedavg)


def test_a_woven_run_on_flower_equals_in_process_and_sends_only_adapters_and_carries(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.records import read_leg
    from tests.test_flower import on_both_backends

    base = tiny_base(tmp_path / "tiny", minilm_folder())
    config = load_config(
        "weaverec",
        [
            "target=synth-0",
            'sources=["synth-1"]',
            *tiny_llm(base),
            "train.batches_per_epoch=2",
            "train.valid_users=6",
            "train.evaluation.users=6",
            "weave.steps=2",
        ],
        FederationConfig,
    )
    flower, inprocess, grids = on_both_backends(config, tmp_path, monkeypatch)
    assert flower == inprocess
    legs = [m for m in grids[0].seen if m.metadata.message_type == "train.leg"]
    assert len(legs) == 16  # 4 hybrid legs and 2 FedAvg rounds of 2 legs, each sent and answered
    adapter = set(build_model(config.model, 12, 0).exchanged())
    for msg in legs:
        _, carry = read_leg(msg)
        assert set(carry.weights) == adapter  # the LoRA factors, nothing of the base model
        assert {k.rsplit(".", 1)[0] for k in carry.moments} <= adapter
    evaluated = {
        m.metadata.dst_node_id
        for m in grids[0].seen
        if m.metadata.message_type == "evaluate" and not m.metadata.reply_to_message_id
    }
    assert len(evaluated) == 1  # the target's party only


def test_a_hybrid_woven_in_pair_order_is_reused_when_the_roles_swap(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_base(tmp_path / "tiny", minilm_folder())
    legs: list[str] = []
    original = InProcess.legs

    def counting(self: InProcess, start: object, requests: list) -> list:
        legs.extend(leg.hybrid for leg, _ in requests)
        return original(self, start, requests)  # type: ignore[arg-type]

    monkeypatch.setattr(InProcess, "legs", counting)
    for target, source in (("synth-0", "synth-1"), ("synth-1", "synth-0")):
        config = load_config(
            "weaverec",
            [
                f"target={target}",
                f'sources=["{source}"]',
                *tiny_llm(base),
                "train.batches_per_epoch=2",
                "train.valid_users=6",
                "train.evaluation.users=6",
                "weave.steps=2",
                "weave.first=pair",
                "weave.reuse=true",
            ],
            FederationConfig,
        )
        simulate(config, InProcess(config), tmp_path / target)
    # the first run wove the hybrid (4 legs), the second reused it; both ran FedAvg's 2 x 2 legs
    assert legs.count("synth-0+synth-1") == 4 and legs.count("fedavg") == 8
    assert len(list((cache / "hybrids").glob("*.json"))) == 1
    events = (tmp_path / "synth-1" / "events.jsonl").read_text()
    assert '"weave_reused"' in events
