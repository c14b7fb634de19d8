"""Privacy mechanisms: the accountant's numbers, the mechanisms' arithmetic, refusals, runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.config import load_config
from fedmerge.errors import FedmergeError
from fedmerge.pipeline import InProcess, simulate
from fedmerge.privacy import Ledger, PrivacyConfig, build_mechanism
from fedmerge.privacy.accountant import calibrated_noise, epsilon_of
from fedmerge.privacy.base import clip_update, l2_norm
from fedmerge.privacy.dpsgd import PoissonSteps
from fedmerge.protocol import FederationConfig
from tests.test_pipeline import tiny

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def gaussian_epsilon(noise: float, releases: int, delta: float) -> float:
    """Epsilon of T Gaussian releases of multiplier z, no sampling, by hand.

    RDP T a / (2 z^2) at order a, converted to (epsilon, delta) as in Balle et al. 2020 (as
    opacus does), minimised over opacus's default orders.
    """
    return min(
        releases * a / (2 * noise**2)
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in ORDERS
    )


def test_the_accountant_matches_the_hand_computed_gaussian_epsilon() -> None:
    for noise, releases in ((1.0, 2), (1.0, 10), (2.0, 5), (0.5, 1)):
        hand = gaussian_epsilon(noise, releases, 1e-5)
        assert epsilon_of([(noise, 1.0, releases)], 1e-5) == pytest.approx(hand, rel=1e-9)
    # z = 1, two releases, delta 1e-5: 7.08 (the value the references give as 7.1)
    assert epsilon_of([(1.0, 1.0, 2)], 1e-5) == pytest.approx(7.0774, abs=1e-3)
    # one ledger composes its rounds: two events of one release each = one event of two
    ledger = Ledger()
    ledger.spend(1.0, 1.0, 1)
    ledger.spend(1.0, 1.0, 1)
    assert ledger.epsilon(1e-5) == pytest.approx(epsilon_of([(1.0, 1.0, 2)], 1e-5))
    assert Ledger.from_json(ledger.to_json()) == ledger
    assert Ledger().epsilon(1e-5) == 0.0 and epsilon_of([(0.0, 1.0, 1)], 1e-5) == math.inf


def test_a_calibrated_noise_spends_at_most_the_target_and_nearly_all_of_it() -> None:
    for target, rate, steps in ((8.0, 1.0, 3), (1.0, 0.01, 1000), (4.0, 0.05, 200)):
        z = calibrated_noise(target, 1e-5, rate, steps)
        spent = epsilon_of([(z, rate, steps)], 1e-5)
        assert 0.97 * target <= spent <= target


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(40, 30, generator=g), "b": torch.randn(17, generator=g)}


def _mechanism(name: str, **settings: float) -> object:
    config = PrivacyConfig(mechanism=name, **settings)
    return build_mechanism(config, rounds=3, seed=0)


def test_no_noise_and_no_clip_give_the_non_private_update_exactly() -> None:
    update = _update()
    g = torch.Generator().manual_seed(1)
    # update-dp: what is sent is the update
    mechanism = build_mechanism(PrivacyConfig(mechanism="update-dp", noise_multiplier=0.0), 3, 0)
    mechanism.config.__dict__["clip"] = math.inf  # the config refuses inf; the arithmetic takes it
    sent = mechanism.send(update, Ledger(), 100, g)
    assert all(torch.equal(sent[k], update[k]) for k in update)
    # central-dp: the plain mean
    central = build_mechanism(PrivacyConfig(mechanism="central-dp", noise_multiplier=0.0), 3, 0)
    central.config.__dict__["clip"] = math.inf
    others = [_update(s) for s in range(3)]
    mean = central.aggregate(others, Ledger(), g)
    assert all(torch.allclose(mean[k], sum(u[k] for u in others) / 3, atol=0) for k in mean)
    # dpsgd: the summed per-record gradients over the expected batch size
    weights = torch.nn.Parameter(torch.randn(5))
    data = torch.randn(8, 5)

    def losses(batch: np.ndarray) -> torch.Tensor:
        return (data[torch.as_tensor(batch)] @ weights).pow(2)

    steps = PoissonSteps(0.5, 2, math.inf, 0.0, 8, torch.Generator().manual_seed(0))
    batch = np.array([0, 3, 4, 7])
    steps.gradient(losses, batch, [weights])
    plain = torch.autograd.grad(losses(batch).sum() / 4.0, weights)[0]
    assert torch.allclose(weights.grad, plain, rtol=1e-5, atol=1e-6)  # summation order


def test_clipping_bounds_every_update_and_every_record() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 100.0):
        update = {k: v * scale for k, v in _update().items()}
        clipped, norm = clip_update(update, 1.5)
        assert l2_norm(list(clipped.values())) <= 1.5 + 1e-9
        if norm <= 1.5:  # a small update is sent as it is
            assert all(torch.equal(clipped[k], update[k]) for k in update)
    mechanism = build_mechanism(
        PrivacyConfig(mechanism="update-dp", noise_multiplier=0.0, clip=0.7), 3, 0
    )
    sent = mechanism.send({k: 50 * v for k, v in _update().items()}, Ledger(), 100, g)
    assert (
        l2_norm(list(sent.values())) == pytest.approx(0.7) and l2_norm(list(sent.values())) <= 0.7
    )
    # dpsgd: each record's gradient counts at most C, so the sum is at most |batch| C / (q N)
    weights = torch.nn.Parameter(torch.ones(5))
    data = 100 * torch.randn(8, 5)
    steps = PoissonSteps(0.5, 2, 0.1, 0.0, 8, torch.Generator().manual_seed(0))
    steps.gradient(lambda b: (data[torch.as_tensor(b)] @ weights).pow(2), np.arange(8), [weights])
    assert float(weights.grad.norm()) <= 8 * 0.1 / 4.0 + 1e-9


def test_update_dp_noise_has_the_stated_scale_and_spends_z_over_2_per_round() -> None:
    mechanism = build_mechanism(
        PrivacyConfig(mechanism="update-dp", noise_multiplier=2.0, clip=0.5), 3, 0
    )
    zero = {"w": torch.zeros(200_000)}
    ledger = Ledger()
    sent = mechanism.send(zero, ledger, 1000, torch.Generator().manual_seed(0))
    assert float(sent["w"].std()) == pytest.approx(2.0 * 0.5, rel=0.01)
    # any change of the party's data moves the clipped update by at most 2C: multiplier z / 2
    assert ledger.events == [(1.0, 1.0, 1)]


def test_a_target_epsilon_is_met_by_every_mechanism_over_the_whole_run(cache: Path) -> None:
    # dpsgd: the steps of all rounds at q = batch / N
    dpsgd = build_mechanism(PrivacyConfig(mechanism="dpsgd", epsilon=4.0), 3, 0)
    q, per_epoch, z = dpsgd.plan(1000, 50, 2)
    assert (q, per_epoch) == (0.05, 20)
    spent = epsilon_of([(z, q, per_epoch * 2)] * 3, 1000**-1.1)
    assert 0.97 * 4.0 <= spent <= 4.0
    update = build_mechanism(PrivacyConfig(mechanism="update-dp", epsilon=4.0), 3, 0)
    assert epsilon_of([(update.noise(1000) / 2, 1.0, 1)] * 3, 1000**-1.1) <= 4.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["privacy.mechanism=update-dp", "privacy.epsilon=0"], "greater than 0"),
        (["privacy.mechanism=update-dp", "privacy.epsilon=-1"], "greater than 0"),
        (["privacy.mechanism=update-dp"], "needs privacy.epsilon"),
        (
            ["privacy.mechanism=dpsgd", "privacy.epsilon=1", "privacy.noise_multiplier=1"],
            "are both given; give one",
        ),
        (["privacy.mechanism=update-dp", "privacy.clip=0", "privacy.epsilon=1"], "clip"),
        (
            ["privacy.mechanism=update-dp", "privacy.epsilon=1", "privacy.budget=2"],
            "drop privacy.budget",
        ),
        (["privacy.mechanism=none", "privacy.epsilon=1"], "spends no (epsilon, delta) budget"),
        (["privacy.mechanism=laplace"], "is no privacy mechanism; use: none"),
        (["privacy.mechanism=secagg"], "set parties_per_domain to 2 or more"),
        (["privacy.mechanism=central-dp", "privacy.epsilon=1"], "merge.method=average"),
        (["privacy.mechanism=update-dp", "privacy.epsilon=1", "privacy.delta=1.5"], "delta"),
    ],
)
def test_bad_privacy_settings_get_one_clear_error(settings: list[str], message: str) -> None:
    with pytest.raises(FedmergeError, match=None) as caught:
        tiny(*settings)
    assert message in str(caught.value)


def test_a_delta_above_one_over_n_is_refused_by_the_party(tmp_path: Path, cache: Path) -> None:
    config = tiny("privacy.mechanism=update-dp", "privacy.epsilon=1", "privacy.delta=0.1")
    with pytest.raises(FedmergeError, match=r"privacy.delta = 0.1 is above 1/N"):
        simulate(config, InProcess(config), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing presented as results


def test_a_family_whose_loss_couples_records_is_refused_for_dpsgd() -> None:
    with pytest.raises(FedmergeError, match="per-record loss"):
        load_config(
            None,
            [
                'domains=["synth-0"]',
                "model.kind=textenc",
                "model.pretrained=false",
                "privacy.mechanism=dpsgd",
                "privacy.epsilon=1",
            ],
            FederationConfig,
        )


def read_run(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_update_dp_run_records_each_party_epsilon_composed_over_rounds(
    tmp_path: Path, cache: Path
) -> None:
    config = tiny(
        "rounds=2", "privacy.mechanism=update-dp", "privacy.noise_multiplier=1", "train.epochs=1"
    )
    simulate(config, InProcess(config), tmp_path / "run")
    record = read_run(tmp_path / "run")["privacy"]
    assert record["mechanism"] == "update-dp"
    assert set(record["switched off"]) == {"evaluate_valid", "local_calibration"}
    for party in config.domains:
        spent = record["spent"][party]
        # two rounds, one release each, multiplier z / 2 = 0.5
        assert spent["epsilon"] == pytest.approx(gaussian_epsilon(0.5, 2, spent["delta"]), rel=1e-9)
        assert spent["delta"] == pytest.approx(400**-1.1, rel=0.2)  # N^-1.1 of the party's users
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {r["split"] for r in rows} == {"test"}
    # noise multiplier 0 (clipping only): the run completes and records no guarantee
    clip_only = tiny("privacy.mechanism=update-dp", "privacy.noise_multiplier=0", "train.epochs=1")
    simulate(clip_only, InProcess(clip_only), tmp_path / "clip-only")
    spent = read_run(tmp_path / "clip-only")["privacy"]["spent"]
    assert all(spent[party]["epsilon"] == "inf" for party in clip_only.domains)


def test_central_dp_shows_no_party_its_own_update(tmp_path: Path, cache: Path) -> None:
    config = tiny(
        "privacy.mechanism=central-dp",
        "privacy.noise_multiplier=1",
        "merge.method=average",
        "merge.learn.mode=none",
        "merge.rows=method",
        "train.epochs=1",
    )
    simulate(config, InProcess(config), tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {r["model"] for r in rows} == {"theta_0", "average (training-free)"}
    spent = read_run(tmp_path / "run")["privacy"]["spent"]
    assert set(spent) == {"server"}
    assert spent["server"]["epsilon"] == pytest.approx(
        gaussian_epsilon(1.0, 1, spent["server"]["delta"]), rel=1e-9
    )


def test_an_exhausted_budget_stops_the_run_after_the_last_round_it_allows(
    tmp_path: Path, cache: Path
) -> None:
    one, two = (gaussian_epsilon(1.0, r, 400**-1.1) for r in (1, 2))  # z / 2 = 1
    config = tiny(
        "rounds=3",
        "privacy.mechanism=update-dp",
        "privacy.noise_multiplier=2",
        f"privacy.budget={(one + two) / 2}",
        "train.epochs=1",
    )
    results = simulate(config, InProcess(config), tmp_path / "run")
    assert results is not None and [r.round for r in results] == [1]
    run = read_run(tmp_path / "run")
    assert (
        run["status"] == "complete"
        and "privacy budget exhausted before round 2" in run["stopped early"]
    )
    assert "stopped early" in (tmp_path / "run" / "report.md").read_text()
    too_small = tiny(
        "privacy.mechanism=update-dp", "privacy.noise_multiplier=2", f"privacy.budget={one / 2}"
    )
    with pytest.raises(FedmergeError, match="no round finished"):
        simulate(too_small, InProcess(too_small), tmp_path / "none")
    assert not (tmp_path / "none").exists()
