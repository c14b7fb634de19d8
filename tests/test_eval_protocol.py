"""The evaluation protocol: candidate lists and the metrics over them.

The lists are seeded, kept, and never hold the target twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.data.synthetic import synthetic_domain
from fedmerge.evaluate import (
    EvalProtocol,
    candidate_lists,
    domain_ranks,
    evaluate_domain,
    summarize,
)
from fedmerge.evaluate.protocol import sampled_users
from fedmerge.pipeline import InProcess, simulate
from tests.test_pipeline import tiny


def test_candidate_lists_hold_each_target_once_among_distinct_negatives_and_are_kept(
    cache: Path,
) -> None:
    domain = synthetic_domain("synth-0")
    protocol = EvalProtocol(candidates=30, seed=3)
    lists = candidate_lists(domain, "test", protocol)
    targets = domain.targets("test")
    targets = targets[targets >= 0]
    assert lists.shape == (len(targets), 31)
    assert (np.diff(lists, axis=1) > 0).all()  # sorted, so distinct
    assert ((lists == targets[:, None]).sum(1) == 1).all()
    assert lists.min() >= 0 and lists.max() < domain.n_items
    saved = list((cache / "candidates").glob("test-uniform-30-seed3-*.npy"))
    assert len(saved) == 1 and np.array_equal(np.load(saved[0]), lists)
    # the same lists for every model and run
    assert np.array_equal(candidate_lists(domain, "test", protocol), lists)
    assert not np.array_equal(
        candidate_lists(domain, "test", EvalProtocol(candidates=30, seed=4)), lists
    )


def test_popularity_negatives_follow_the_training_counts(cache: Path) -> None:
    domain = synthetic_domain("synth-0")
    counts = domain.item_counts()
    popular, rare = int(np.argmax(counts)), int(np.argmin(counts))
    drawn = {
        sampler: np.bincount(
            candidate_lists(domain, "valid", EvalProtocol(candidates=20, sampler=sampler)).ravel(),
            minlength=domain.n_items,
        )
        for sampler in ("uniform", "popularity")
    }
    assert drawn["popularity"][popular] > 2 * drawn["uniform"][popular]
    assert drawn["popularity"][rare] < drawn["uniform"][rare]


def test_metrics_over_candidate_lists_match_a_hand_computed_ranking(cache: Path) -> None:
    domain = synthetic_domain("synth-1")
    protocol = EvalProtocol(candidates=9, seed=1)

    def by_item_id(d, users, split, candidates):  # type: ignore[no-untyped-def]  # a higher item id always scores higher
        scores = torch.arange(d.n_items, dtype=torch.float32).expand(len(users), -1).clone()
        return scores if candidates is None else scores.gather(1, candidates)

    metrics = evaluate_domain(by_item_id, domain, "test", batch_size=64, protocol=protocol)
    lists = candidate_lists(domain, "test", protocol)
    targets = domain.targets("test")
    targets = targets[targets >= 0]
    ranks = (lists > targets[:, None]).sum(1)  # candidates with a larger id rank above the target
    expected = summarize(torch.from_numpy(ranks))
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["recall@10"] == 1.0  # ten candidates: every target is in the top 10

    # every item is a candidate: full ranking
    everything = EvalProtocol(candidates=domain.n_items - 1)
    full = evaluate_domain(by_item_id, domain, "test")
    assert evaluate_domain(by_item_id, domain, "test", protocol=everything) == pytest.approx(full)


def test_per_user_ranks_are_the_hand_computed_ranks_of_the_sampled_users(cache: Path) -> None:
    domain = synthetic_domain("synth-1")
    protocol = EvalProtocol(candidates=9, seed=1, users=50)

    def by_item_id(d, users, split, candidates):  # type: ignore[no-untyped-def]
        return candidates.float()  # a higher item id always scores higher

    def ranked() -> torch.Tensor:
        return domain_ranks(by_item_id, domain, "test", batch_size=16, protocol=protocol)

    targets = domain.targets("test")
    sample = sampled_users(np.flatnonzero(targets >= 0), protocol)
    lists = candidate_lists(domain, "test", protocol)[sample]
    expected = (lists > targets[targets >= 0][sample][:, None]).sum(1)
    ranks = ranked()
    assert len(ranks) == 50
    assert sorted(ranks.tolist()) == sorted(expected.tolist())
    assert torch.equal(ranked(), ranks)  # the same users in the same order: comparable user by user
    assert evaluate_domain(by_item_id, domain, "test", protocol=protocol) == pytest.approx(
        {**summarize(ranks), "users": 50}
    )


def test_every_row_and_the_report_record_the_protocol(tmp_path: Path, cache: Path) -> None:
    config = tiny("train.evaluation.candidates=20", "merge.learn.steps=5", "evaluate_valid=false")
    simulate(config, InProcess(config), tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {r["protocol"] for r in rows} == {"20 uniform negatives, seed 0"}
    assert all(r["recall@50"] == 1.0 for r in rows)  # 21 candidates: every target is in the top 50
    assert (
        "each target ranked among 20 uniform negatives, seed 0"
        in (tmp_path / "run" / "report.md").read_text()
    )
