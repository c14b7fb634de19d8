"""DomainData: leave-one-out split, saving, and synthetic domains."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmerge.data.catalog import import_domain, load_domain
from fedmerge.data.domain import DomainData, from_sequences, full_sequences
from fedmerge.data.registry import REGISTRY, DatasetSpec
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import evaluate_domain
from fedmerge.evaluate.popularity import popularity_scorer
from tests.conftest import cache_files
from tests.test_importers import make_mergerec


def test_leave_one_out_split() -> None:
    domain = from_sequences(
        "d",
        list("abcdef"),
        {"title": list("abcdef")},
        ["u0", "u1", "u2"],
        [[0, 1, 2, 3, 4], [5, 4], [3]],
    )
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

    def chain(data: DomainData, users: np.ndarray, split: str, candidates: None):
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


# --------------------------------------------------------------------------------------------
# Corrupted or unwritable domain caches
# --------------------------------------------------------------------------------------------


@pytest.fixture
def toy_spec(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> DatasetSpec:
    """A registered domain 'toyreg' whose (tiny MergeRec) archive is on a file:// mirror."""
    data = make_mergerec(tmp_path / "Toy.tar.gz").read_bytes()
    spec = DatasetSpec(
        "toyreg",
        "me/repo/Toy.tar.gz",
        hashlib.sha256(data).hexdigest(),
        "mergerec",
        "toy",
        "none",
        (3, 5, 10),
    )
    (tmp_path / "mirror" / "me" / "repo").mkdir(parents=True)
    (tmp_path / "mirror" / spec.path).write_bytes(data)
    monkeypatch.setenv("FEDMERGE_MIRROR", (tmp_path / "mirror").as_uri() + "/")
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    return spec


def _same(a: DomainData, b: DomainData) -> bool:
    return (a.item_ids, a.user_ids, a.item_text) == (b.item_ids, b.user_ids, b.item_text) and all(
        np.array_equal(getattr(a, key), getattr(b, key))
        for key in ("train_offsets", "train_items", "valid", "test")
    )


def _other_arrays(path: Path) -> None:
    with np.load(path) as arrays:
        parts = dict(arrays)
    np.savez(path, **(parts | {"train_items": parts["train_items"][:-1]}))


CORRUPTIONS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "domain.json-garbage": ("domain.json", lambda p: p.write_bytes(b"\x00\xffnot json")),
    "domain.json-truncated": (
        "domain.json",
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    ),
    "domain.json-a-list": ("domain.json", lambda p: p.write_text("[1, 2]")),
    "arrays.npz-truncated": (
        "arrays.npz",
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    ),
    "arrays.npz-garbage": ("arrays.npz", lambda p: p.write_bytes(b"\x93NUMPY garbage" * 10)),
    "arrays.npz-missing": ("arrays.npz", lambda p: p.unlink()),
    "arrays.npz-inconsistent": ("arrays.npz", _other_arrays),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_registered_cache_is_reported_and_rebuilt(
    case: str, toy_spec: DatasetSpec, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = load_domain("toyreg", quiet=True)
    files = cache_files(cache)
    processed = cache / "domains" / f"toyreg-{toy_spec.sha256[:12]}"
    assert files == [
        f"domains/{processed.name}/arrays.npz",
        f"domains/{processed.name}/domain.json",
        f"raw/{toy_spec.path}",
    ]
    capsys.readouterr()
    name, corrupt = CORRUPTIONS[case]
    corrupt(processed / name)

    again = load_domain("toyreg", quiet=True)
    err = capsys.readouterr().err
    assert (
        err
        == f"warning: the cached domain file {processed / name} is corrupt; rebuilding toyreg from "
        "its archive\n"
    )
    assert _same(again, first) and again.n_interactions == 10
    assert cache_files(cache) == files  # rebuilt in place, nothing left beside it
    assert _same(DomainData.load(processed), first)
    load_domain("toyreg", quiet=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("case", ["domain.json-truncated", "arrays.npz-garbage"])
def test_corrupt_imported_domain_says_to_import_it_again(
    case: str, tmp_path: Path, cache: Path
) -> None:
    import_domain(make_mergerec(tmp_path / "Toy.tar.gz"), "mergerec", "mine")
    name, corrupt = CORRUPTIONS[case]
    corrupt(cache / "imported" / "mine" / name)
    before = {f: (cache / f).read_bytes() for f in cache_files(cache)}
    with pytest.raises(FedmergeError) as err:
        load_domain("mine")
    assert str(err.value) == (
        f"the imported domain 'mine' is unreadable: {cache / 'imported' / 'mine' / name} is "
        "corrupt; import it again with `fedmerge data import PATH --format FORMAT --name mine "
        "--replace`"
    )
    # the evidence is left alone
    assert {f: (cache / f).read_bytes() for f in cache_files(cache)} == before


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("file", ["arrays.npz", "domain.json"])
def test_full_disk_while_caching_a_domain_names_the_file_and_leaves_nothing(
    file: str, toy_spec: DatasetSpec, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if file == "arrays.npz":
        monkeypatch.setattr(np, "savez", _disk_full)
    else:
        real = Path.write_text
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda self, *a, **k: _disk_full() if self.name == file else real(self, *a, **k),
        )
    with pytest.raises(FedmergeError) as err:
        load_domain("toyreg", quiet=True)
    target = cache / "domains" / f"toyreg-{toy_spec.sha256[:12]}" / file
    assert str(err.value) == (
        f"cannot write {target}: the disk is full (No space left on device); nothing was kept: "
        "free disk space or set FEDMERGE_DATA to a folder on a disk with room"
    )
    assert cache_files(cache) == [f"raw/{toy_spec.path}"]
    assert list((cache / "domains").iterdir()) == []  # no temporary folder either
    monkeypatch.undo()
    monkeypatch.setenv("FEDMERGE_DATA", str(cache))
    monkeypatch.setenv("FEDMERGE_MIRROR", "file:///nowhere/")  # the next load needs no download
    monkeypatch.setitem(REGISTRY, toy_spec.name, toy_spec)
    assert load_domain("toyreg", quiet=True).n_interactions == 10


def test_save_over_an_existing_folder_replaces_it_whole(tmp_path: Path) -> None:
    synthetic_domain("synth-1").save(tmp_path / "d")
    domain = synthetic_domain("synth-2")
    domain.save(tmp_path / "d")
    assert _same(DomainData.load(tmp_path / "d"), domain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_empty_domains_are_refused() -> None:
    with pytest.raises(
        FedmergeError, match=r"domain 'e' holds no interactions \(0 users, 0 interactions\)"
    ):
        from_sequences("e", ["a"], {"title": ["a"]}, [], [])
    with pytest.raises(FedmergeError, match="x.inter: user 'u2' has no interactions"):
        from_sequences(
            "e", ["a"], {"title": ["a"]}, ["u1", "u2"], [[0], []], source={"path": "x.inter"}
        )
