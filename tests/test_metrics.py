"""Full-ranking metrics against rankings computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmerge.data.domain import from_sequences
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain, rank_embeddings, rank_targets, summarize
from fedmerge.evaluate.popularity import popularity_scorer


def test_ranks_match_hand_computed_ranking() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # target 2: only item 0 is higher -> rank 1
            [0.2, 0.8, 0.4, 0.6],  # target 1: best -> rank 0
            [0.7, 0.6, 0.5, 0.4],  # target 3: worst -> rank 3
        ]
    )
    assert rank_targets(scores, torch.tensor([2, 1, 3])).tolist() == [1, 0, 3]


def test_ties_are_broken_by_item_index() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # a constant model gets no credit for ties: target k has the k items before it ahead of it
    assert [int(rank_targets(scores, torch.tensor([k]))) for k in range(4)] == [0, 1, 2, 3]
    assert int(rank_targets(scores, torch.tensor([4]))) == 4


def test_metrics_from_ranks_by_hand() -> None:
    ranks = torch.tensor([0, 1, 4, 9, 30])
    m = summarize(ranks, ks=(1, 5, 10))
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@5"] == pytest.approx(3 / 5)
    assert m["recall@10"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["ndcg@10"] == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5
    )
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10) / 5)
    assert m["ndcg@1"] == m["recall@1"] == m["mrr@1"]


def test_blocked_ranking_equals_sorting() -> None:
    """Many rows (several internal blocks) give the same ranks as a full stable sort."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (3000, 700), generator=generator).float()  # many ties
    targets = torch.randint(0, 700, (3000,), generator=generator)
    order = torch.sort(-scores, dim=1, stable=True).indices
    expected = (order == targets[:, None]).nonzero()[:, 1]
    assert torch.equal(rank_targets(scores, targets), expected)


def test_rank_embeddings_equals_dense_scores() -> None:
    generator = torch.Generator().manual_seed(1)
    users, items = torch.randn(100, 8, generator=generator), torch.randn(37, 8, generator=generator)
    targets = torch.randint(0, 37, (100,), generator=generator)
    assert torch.equal(
        rank_embeddings(users, items, targets, batch_size=7), rank_targets(users @ items.T, targets)
    )


def test_nan_scores_are_rejected() -> None:
    with pytest.raises(FedmergeError, match="NaN"):
        rank_targets(torch.tensor([[0.1, float("nan"), 0.3]]), torch.tensor([0]))


def _tiny_domain():
    # items 0..4; popularity on train: item 0 x3, item 1 x2, item 2 x1
    sequences = [[0, 1, 0, 2, 3], [0, 1, 4], [2, 3, 4]]
    return from_sequences(
        "tiny",
        [f"i{i}" for i in range(5)],
        {"title": [f"t{i}" for i in range(5)]},
        ["a", "b", "c"],
        sequences,
    )


def test_popularity_on_hand_made_domain() -> None:
    domain = _tiny_domain()
    # train: a=[0,1,0], b=[0], c=[2]; counts = [3, 1, 1, 0, 0]; valid: a->2, b->1, c->3; test: a->3,
    # b->4, c->4
    np.testing.assert_array_equal(domain.item_counts(), [3, 1, 1, 0, 0])
    # ranking (ties by index): 0, 1, 2, 3, 4 -> valid ranks 2, 1, 3; test ranks 3, 4, 4
    valid = evaluate_domain(popularity_scorer, domain, "valid", batch_size=2)
    assert valid["users"] == 3
    assert valid["recall@1"] == 0 and valid["recall@5"] == 1
    assert valid["mrr@5"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    test = evaluate_domain(popularity_scorer, domain, "test")
    assert test["ndcg@5"] == pytest.approx((1 / math.log2(5) + 2 / math.log2(6)) / 3)


def test_exclude_seen_masks_history_but_keeps_target() -> None:
    domain = _tiny_domain()
    # test split, history a=[0,1,0,2] -> remaining order 3, 4: a's target 3 ranks 0
    # b: history [0,1] -> order 2, 3, 4: target 4 ranks 2;
    # c: history [2,3] -> order 0, 1, 4: target 4 ranks 2
    m = evaluate_domain(popularity_scorer, domain, "test", exclude_seen=True)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    # a repeated item that is the target stays rankable: valid target of a is 2 (not in [0,1,0])
    assert evaluate_domain(popularity_scorer, domain, "valid", exclude_seen=True)["recall@5"] == 1


def test_users_without_target_are_skipped() -> None:
    domain = from_sequences(
        "d", ["x", "y", "z"], {"title": ["x", "y", "z"]}, ["u1", "u2"], [[0, 1, 2], [1]]
    )
    assert evaluate_domain(popularity_scorer, domain, "test")["users"] == 1
