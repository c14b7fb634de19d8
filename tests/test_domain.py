"""DomainData: leave-one-out split, saving, and synthetic domains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmerge.data.catalog import load_domain
from fedmerge.data.domain import DomainData, from_sequences, full_sequences
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain
from fedmerge.models.popularity import popularity_scorer


def test_leave_one_out_split() -> None:
    domain = from_sequences("d", list("abcdef"), {"title": list("abcdef")}, ["u0", "u1", "u2"],
                            [[0, 1, 2, 3, 4], [5, 4], [3]])
    np.testing.assert_array_equal(domain.train_sequence(0), [0, 1, 2])
    assert (domain.valid[0], domain.test[0]) == (3, 4)
    np.testing.assert_array_equal(domain.train_sequence(1), [5])
    assert (domain.valid[1], domain.test[1]) == (-1, 4)
    np.testing.assert_array_equal(domain.train_sequence(2), [3])
    assert (domain.valid[2], domain.test[2]) == (-1, -1)
    np.testing.assert_array_equal(domain.history(0, "test"), [0, 1, 2, 3])
    np.testing.assert_array_equal(domain.history(0, "valid"), [0, 1, 2])
    assert domain.n_interactions == 8
    assert [s.tolist() for s in full_sequences(domain)] == [[0, 1, 2, 3, 4], [5, 4], [3]]


def test_inconsistent_arrays_are_rejected() -> None:
    with pytest.raises(FedmergeError, match="outside"):
        from_sequences("d", ["a"], {"title": ["a"]}, ["u"], [[0, 1, 0]])
    with pytest.raises(FedmergeError, match="text field"):
        from_sequences("d", ["a", "b"], {"title": ["a"]}, ["u"], [[0, 1]])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    domain = synthetic_domain("synth-2")
    domain.save(tmp_path / "d")
    again = DomainData.load(tmp_path / "d")
    assert again.item_ids == domain.item_ids and again.user_ids == domain.user_ids
    assert again.item_text == domain.item_text
    for key in ("train_offsets", "train_items", "valid", "test"):
        np.testing.assert_array_equal(getattr(again, key), getattr(domain, key))
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folder left behind


def test_synthetic_is_deterministic_and_disjoint() -> None:
    a, b, a2 = synthetic_domain("synth-0"), synthetic_domain("synth-1"), load_domain("synth-0")
    np.testing.assert_array_equal(a.train_items, a2.train_items)
    assert a.item_text == a2.item_text
    assert not set(a.item_ids) & set(b.item_ids)
    assert not set(a.user_ids) & set(b.user_ids)
    assert a.item_text["title"] != b.item_text["title"]
    assert (a.n_users, a.n_items) == (400, 200) and a.n_interactions > 400 * 6


def test_synthetic_next_item_is_predictable_beyond_popularity() -> None:
    """An oracle that follows the item chain (last item + 1) beats popularity by far."""
    domain = synthetic_domain("synth-0")

    def chain(data: DomainData, users: np.ndarray, split: str):
        import torch

        scores = torch.zeros(len(users), data.n_items)
        last = [int(data.history(int(u), split)[-1]) for u in users]
        nxt = [(i // 25) * 25 + (i % 25 + 1) % 25 for i in last]
        scores[range(len(users)), nxt] = 1.0
        return scores

    oracle = evaluate_domain(chain, domain, "test")["recall@1"]
    popularity = evaluate_domain(popularity_scorer, domain, "test")["recall@10"]
    assert oracle > 0.5 and oracle > 3 * popularity


def test_unknown_domain_lists_the_known_ones(cache: Path) -> None:
    with pytest.raises(FedmergeError, match="unknown domain 'nope'.*beauty.*electronics.*synth-N"):
        load_domain("nope")
