"""Importers (MergeRec tarball, SeqRecBenchmark proc.zip, RecBole atomic files).

Tested on small hand-made archives.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import tarfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmerge.data.catalog import import_domain, imported_names, load_domain
from fedmerge.data.domain import DomainData, from_sequences
from fedmerge.data.importers import read_archive, safe_io, seqrec
from fedmerge.data.importers.mergerec import read_mergerec
from fedmerge.data.importers.recbole import read_recbole, write_recbole
from fedmerge.data.importers.seqrec import read_seqrec_zip
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from tests.conftest import cache_files

# --------------------------------------------------------------------------------------------
# Archive builders
# --------------------------------------------------------------------------------------------

# 3 users, 5 items; smap is deliberately not in index order, user 2 has no val/test.
MERGEREC_MEMBERS: dict[str, object] = {
    "smap.json": {"B005": 0, "A001": 1, "C003": 2, "A002": 3, "Z999": 4},
    "umap.json": {"rev-b": 1, "rev-a": 0, "rev-c": 2},
    "train.json": {"2": [2], "0": [1, 2, 3], "1": [4, 0]},
    "val.json": {"0": [4], "1": [1]},
    "test.json": {"1": [3], "0": [0]},
    "meta_data.json": {
        "B005": {"title": "Lipstick", "brand": "Acme", "category": ""},
        "A001": {"title": "Soap", "brand": "", "category": ""},
        "C003": {"title": "Brush", "brand": None, "category": ""},
        # A002 has no metadata at all
        "Z999": {"title": "Comb"},
    },
}


def make_mergerec(
    path: Path,
    members: dict[str, object] | None = None,
    drop: tuple[str, ...] = (),
    folder: str = "Toy",
) -> Path:
    """A MergeRec-style .tar.gz: ``folder/`` holding the JSON members.

    Minus `drop`; bytes are written as is.
    """
    members = MERGEREC_MEMBERS if members is None else members
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        for member, content in members.items():
            if member in drop:
                continue
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


SEQREC_USERS = pd.DataFrame(
    {
        "UserID": [1, 2, 3, 4],
        "ItemID": [[100, 101, 102, 103], [103, 100, 101, 102], [101, 100], [103]],
        # user 2 is out of time order, with a tie (103 and 101 both at 50: file order kept)
        "Timestamp": [[10, 20, 30, 40], [50, 10, 50, 20], [5, 6], [7]],
    }
)
SEQREC_TITLES = pd.DataFrame(
    {
        "ItemID": [103, 100, 102, 101, 104],
        "Title": ["Delta", "Alpha", None, "Bravo", "Echo"],
    }
)


def _pickled(frame: pd.DataFrame, tmp: Path) -> bytes:
    frame.to_pickle(tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def make_seqrec(
    path: Path, users: pd.DataFrame = SEQREC_USERS, titles: pd.DataFrame = SEQREC_TITLES
) -> Path:
    """A SeqRecBenchmark-style proc.zip (pickles written with ``DataFrame.to_pickle``)."""
    scratch = path.with_name(path.name + ".pkl")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("proc/user2item.pkl", _pickled(users, scratch))
        archive.writestr("proc/item2title.pkl", _pickled(titles, scratch))
        archive.writestr("proc/summary.json", json.dumps({"users": len(users)}))
    return path


RECBOLE_INTER = (
    "user_id:token\titem_id:token\ttimestamp:float\n"
    "u2\ti3\t300\n"
    "u1\ti1\t100\n"
    "u2\ti1\t50\n"
    "u1\ti9\t200\n"  # i9 is not in x.item
    "u1\ti2\t150\n"
    "u2\ti2\t400\n"
    "u3\ti2\t10\n"
)
RECBOLE_ITEM = (
    "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\n"
    "i1\tRed Shoe\tAcme\tShoes Red\n"
    "i2\tBlue Hat\tHatco\tHats\n"
    "i3\tGreen Scarf\t\tScarves\n"
    "i7\tUnused Thing\tNobody\tMisc\n"  # in the catalogue, never interacted with
)


def make_recbole(
    folder: Path, inter: str = RECBOLE_INTER, item: str | None = RECBOLE_ITEM, stem: str = "x"
) -> Path:
    """A folder with ``stem.inter`` (and ``stem.item`` unless `item` is None)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.inter").write_text(inter)
    if item is not None:
        (folder / f"{stem}.item").write_text(item)
    return folder


def truncated(path: Path) -> Path:
    """`path` cut to half its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def assert_same_domain(got: DomainData, want: DomainData) -> None:
    assert got.item_ids == want.item_ids
    assert got.item_text == want.item_text
    assert got.user_ids == want.user_ids
    np.testing.assert_array_equal(got.train_offsets, want.train_offsets)
    np.testing.assert_array_equal(got.train_items, want.train_items)
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_array_equal(got.test, want.test)


# --------------------------------------------------------------------------------------------
# MergeRec
# --------------------------------------------------------------------------------------------


def test_mergerec_ids_text_and_published_split(tmp_path: Path) -> None:
    path = make_mergerec(tmp_path / "Toy.tar.gz")
    domain = read_archive(path, "mergerec", "toy")

    assert domain.name == "toy"
    assert domain.item_ids == ["B005", "A001", "C003", "A002", "Z999"]
    assert domain.user_ids == ["rev-a", "rev-b", "rev-c"]
    # category is empty for every item, so it is dropped; None and missing metadata give ""
    assert domain.item_text == {
        "title": ["Lipstick", "Soap", "Brush", "", "Comb"],
        "brand": ["Acme", "", "", "", ""],
    }
    np.testing.assert_array_equal(domain.train_sequence(0), [1, 2, 3])
    np.testing.assert_array_equal(domain.train_sequence(1), [4, 0])
    np.testing.assert_array_equal(domain.train_sequence(2), [2])
    np.testing.assert_array_equal(domain.train_offsets, [0, 3, 5, 6])
    np.testing.assert_array_equal(domain.valid, [4, 1, -1])
    np.testing.assert_array_equal(domain.test, [0, 3, -1])
    assert domain.train_items.dtype == np.int64 and domain.valid.dtype == np.int64
    assert domain.n_interactions == 10
    assert domain.source == {"format": "mergerec", "path": str(path)}
    assert domain.summary() == {
        "name": "toy",
        "users": 3,
        "items": 5,
        "interactions": 10,
        "train_interactions": 6,
        "valid_users": 2,
        "test_users": 2,
        "avg_sequence_length": 3.333,
        "text_fields": ["brand", "title"],
        "density": 0.666667,
    }


def test_mergerec_folder_name_does_not_matter(tmp_path: Path) -> None:
    a = read_mergerec(make_mergerec(tmp_path / "a.tar.gz", folder="Beauty"), "a")
    b = read_mergerec(make_mergerec(tmp_path / "b.tar.gz", folder="Something_Else"), "a")
    assert_same_domain(a, b)


def test_mergerec_non_contiguous_ids_are_rejected(tmp_path: Path) -> None:
    members = dict(
        MERGEREC_MEMBERS, **{"smap.json": {"B005": 0, "A001": 1, "C003": 2, "A002": 3, "Z999": 7}}
    )
    with pytest.raises(FedmergeError, match="item ids are not contiguous from 0"):
        read_mergerec(make_mergerec(tmp_path / "bad.tar.gz", members), "bad")


def test_mergerec_item_outside_catalogue_is_rejected(tmp_path: Path) -> None:
    members = dict(MERGEREC_MEMBERS, **{"test.json": {"0": [0], "1": [5]}})
    with pytest.raises(FedmergeError, match=r"refers to an item outside 0\.\.4"):
        read_mergerec(make_mergerec(tmp_path / "bad.tar.gz", members), "bad")


# --------------------------------------------------------------------------------------------
# SeqRecBenchmark proc.zip
# --------------------------------------------------------------------------------------------


def test_seqrec_unpinned_archive_needs_allow_pickle(tmp_path: Path) -> None:
    path = make_seqrec(tmp_path / "proc.zip")
    with pytest.raises(FedmergeError, match="--allow-pickle") as err:
        read_archive(path, "seqrec-zip", "mine")
    assert "not pinned" in str(err.value)
    assert read_archive(path, "seqrec-zip", "mine", allow_pickle=True).n_users == 4


def test_seqrec_index_titles_and_leave_one_out(tmp_path: Path) -> None:
    path = make_seqrec(tmp_path / "proc.zip")
    domain = read_archive(path, "seqrec-zip", "mine", allow_pickle=True)

    # items indexed by ItemID order; the missing title becomes ""; 104 has no interactions
    assert domain.item_ids == ["100", "101", "102", "103", "104"]
    assert domain.item_text == {"title": ["Alpha", "Bravo", "", "Delta", "Echo"]}
    assert domain.user_ids == ["1", "2", "3", "4"]
    # user 1 (n=4): train 2, valid, test
    np.testing.assert_array_equal(domain.train_sequence(0), [0, 1])
    # user 2 sorted stably by time: 100@10, 102@20, 103@50, 101@50 -> [0, 2, 3, 1]
    np.testing.assert_array_equal(domain.train_sequence(1), [0, 2])
    # user 3 (n=2): one training item and a test target; user 4 (n=1): training only
    np.testing.assert_array_equal(domain.train_sequence(2), [1])
    np.testing.assert_array_equal(domain.train_sequence(3), [3])
    np.testing.assert_array_equal(domain.train_offsets, [0, 2, 4, 5, 6])
    np.testing.assert_array_equal(domain.valid, [2, 3, -1, -1])
    np.testing.assert_array_equal(domain.test, [3, 1, 0, -1])
    np.testing.assert_array_equal(domain.item_counts(), [2, 2, 1, 1, 0])
    assert domain.n_interactions == 11
    assert domain.source["format"] == "seqrec-zip"
    assert len(domain.source["sha256"]) == 64


def test_seqrec_without_timestamps_keeps_list_order(tmp_path: Path) -> None:
    users = SEQREC_USERS.drop(columns="Timestamp")
    domain = read_seqrec_zip(
        make_seqrec(tmp_path / "proc.zip", users=users), "mine", allow_pickle=True
    )
    np.testing.assert_array_equal(domain.train_sequence(1), [3, 0])
    np.testing.assert_array_equal(domain.valid, [2, 1, -1, -1])
    np.testing.assert_array_equal(domain.test, [3, 2, 0, -1])


def test_seqrec_item_without_title_row_is_rejected(tmp_path: Path) -> None:
    titles = SEQREC_TITLES[SEQREC_TITLES["ItemID"] != 101]
    path = make_seqrec(tmp_path / "proc.zip", titles=titles)
    with pytest.raises(FedmergeError, match="refers to item 101 that item2title.pkl lacks"):
        read_seqrec_zip(path, "mine", allow_pickle=True)


def test_seqrec_zip_missing_member_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "proc.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("user2item.pkl", _pickled(SEQREC_USERS, tmp_path / "u.pkl"))
    with pytest.raises(FedmergeError, match="it lacks item2title.pkl"):
        read_seqrec_zip(path, "mine", allow_pickle=True)


# --------------------------------------------------------------------------------------------
# RecBole atomic files
# --------------------------------------------------------------------------------------------


def test_recbole_orders_by_time_and_keeps_catalogue(tmp_path: Path) -> None:
    folder = make_recbole(tmp_path / "rb")
    domain = read_archive(folder, "recbole", "rb")

    # .item order first (i7 has no interactions), then i9 (only in .inter)
    assert domain.item_ids == ["i1", "i2", "i3", "i7", "i9"]
    assert domain.item_text == {
        "title": ["Red Shoe", "Blue Hat", "Green Scarf", "Unused Thing", ""],
        "brand": ["Acme", "Hatco", "", "Nobody", ""],
        "category": ["Shoes Red", "Hats", "Scarves", "Misc", ""],
    }
    # users in order of their first interaction in time
    assert domain.user_ids == ["u3", "u2", "u1"]
    # u3: [i2] -> train only; u2: i1@50, i3@300, i2@400; u1: i1@100, i2@150, i9@200
    np.testing.assert_array_equal(domain.train_offsets, [0, 1, 2, 3])
    np.testing.assert_array_equal(domain.train_items, [1, 0, 0])
    np.testing.assert_array_equal(domain.valid, [-1, 2, 1])
    np.testing.assert_array_equal(domain.test, [-1, 1, 4])
    np.testing.assert_array_equal(domain.item_counts(), [2, 1, 0, 0, 0])
    assert domain.n_interactions == 7
    assert domain.source == {"format": "recbole", "path": str(folder / "x.inter")}


def test_recbole_without_timestamp_keeps_file_order(tmp_path: Path) -> None:
    inter = "user_id:token\titem_id:token\nb\tp\na\tq\nb\tr\nb\tq\na\tp\n"
    folder = make_recbole(tmp_path / "rb", inter=inter, item=None, stem="y")
    # passing the .inter file itself works too
    for path in (folder, folder / "y.inter"):
        domain = read_recbole(path, "rb")
        assert domain.item_ids == ["p", "q", "r"]
        assert domain.item_text == {}
        assert domain.user_ids == ["b", "a"]
        np.testing.assert_array_equal(domain.train_offsets, [0, 1, 2])
        # b: p (r valid, q test); a: q (p test)
        np.testing.assert_array_equal(domain.train_items, [0, 1])
        np.testing.assert_array_equal(domain.valid, [2, -1])
        np.testing.assert_array_equal(domain.test, [1, 0])


def test_recbole_several_inter_files_are_ambiguous(tmp_path: Path) -> None:
    folder = make_recbole(tmp_path / "rb", stem="x")
    make_recbole(folder, stem="z", item=None)
    with pytest.raises(FedmergeError, match=r"several \.inter files \(x\.inter, z\.inter\)"):
        read_recbole(folder, "rb")


def test_recbole_bad_timestamp_is_rejected(tmp_path: Path) -> None:
    inter = "user_id:token\titem_id:token\ttimestamp:float\na\tp\tyesterday\n"
    folder = make_recbole(tmp_path / "rb", inter=inter, item=None)
    with pytest.raises(
        FedmergeError, match="x.inter, line 2: timestamp 'yesterday' is not a finite number"
    ):
        read_recbole(folder, "rb")


# --------------------------------------------------------------------------------------------
# RecBole export / import round trip
# --------------------------------------------------------------------------------------------


def test_recbole_round_trip_synthetic(tmp_path: Path) -> None:
    domain = synthetic_domain("synth-3")
    paths = write_recbole(domain, tmp_path / "out")
    assert [p.name for p in paths] == ["synth-3.inter", "synth-3.item"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["synth-3.inter", "synth-3.item"]
    back = read_recbole(tmp_path / "out", "synth-3")
    assert_same_domain(back, domain)


def test_recbole_round_trip_seqrec(tmp_path: Path) -> None:
    domain = read_seqrec_zip(make_seqrec(tmp_path / "proc.zip"), "mine", allow_pickle=True)
    write_recbole(domain, tmp_path / "out")
    assert (tmp_path / "out" / "mine.item").read_text().splitlines() == [
        "item_id:token\ttitle:token_seq",
        "100\tAlpha",
        "101\tBravo",
        "102\t",
        "103\tDelta",
        "104\tEcho",
    ]
    assert_same_domain(read_recbole(tmp_path / "out", "mine"), domain)


# --------------------------------------------------------------------------------------------
# Bad input through import_domain: a clear error and nothing left in the cache
# --------------------------------------------------------------------------------------------


def _truncated_mergerec(tmp: Path) -> tuple[Path, str, str]:
    return truncated(make_mergerec(tmp / "Toy.tar.gz")), "mergerec", "truncated or corrupt"


def _zip_as_mergerec(tmp: Path) -> tuple[Path, str, str]:
    return make_seqrec(tmp / "proc.zip"), "mergerec", "is not a readable MergeRec tarball"


def _mergerec_without_test(tmp: Path) -> tuple[Path, str, str]:
    return make_mergerec(tmp / "Toy.tar.gz", drop=("test.json",)), "mergerec", "it lacks test.json"


def _mergerec_bad_json(tmp: Path) -> tuple[Path, str, str]:
    members = dict(MERGEREC_MEMBERS, **{"val.json": b"{not json"})
    return make_mergerec(tmp / "Toy.tar.gz", members), "mergerec", "a JSON file inside is malformed"


def _truncated_seqrec(tmp: Path) -> tuple[Path, str, str]:
    return truncated(make_seqrec(tmp / "proc.zip")), "seqrec-zip", "is not a readable zip archive"


def _recbole_bad_header(tmp: Path) -> tuple[Path, str, str]:
    folder = make_recbole(tmp / "rb", inter="user_id\titem_id\na\tp\n", item=None)
    return folder, "recbole", "header field 'user_id' is not 'name:type'"


def _recbole_no_inter(tmp: Path) -> tuple[Path, str, str]:
    folder = tmp / "rb"
    folder.mkdir()
    (folder / "x.item").write_text(RECBOLE_ITEM)
    return folder, "recbole", "holds no .inter file"


def _missing_path(tmp: Path) -> tuple[Path, str, str]:
    return tmp / "nowhere.tar.gz", "mergerec", "does not exist"


def _unknown_format(tmp: Path) -> tuple[Path, str, str]:
    return make_mergerec(tmp / "Toy.tar.gz"), "parquet", "unknown format 'parquet'"


BAD_INPUTS: dict[str, Callable[[Path], tuple[Path, str, str]]] = {
    "truncated-mergerec": _truncated_mergerec,
    "zip-as-mergerec": _zip_as_mergerec,
    "mergerec-without-test": _mergerec_without_test,
    "mergerec-bad-json": _mergerec_bad_json,
    "truncated-seqrec": _truncated_seqrec,
    "recbole-bad-header": _recbole_bad_header,
    "recbole-no-inter": _recbole_no_inter,
    "missing-path": _missing_path,
    "unknown-format": _unknown_format,
}


# --------------------------------------------------------------------------------------------
# Malformed archives that must not escape as raw exceptions (or be silently misread).
# --------------------------------------------------------------------------------------------


def _seqrec_corrupt_deflate(tmp: Path) -> tuple[Path, str, str]:
    """A proc.zip whose directory is intact but whose compressed user2item.pkl bytes are garbled."""
    path = make_seqrec(tmp / "proc.zip")
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("proc/user2item.pkl")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    for k in range(start + 5, start + 25):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, "seqrec-zip", "not a readable zip archive"


def _seqrec_directory(tmp: Path) -> tuple[Path, str, str]:
    (tmp / "adir").mkdir()
    return tmp / "adir", "seqrec-zip", "is not a regular file but a directory"


def _mergerec_val_user_out_of_range(tmp: Path) -> tuple[Path, str, str]:
    members = dict(MERGEREC_MEMBERS, **{"val.json": {"0": [4], "1": [1], "5": [2]}})
    return make_mergerec(tmp / "Toy.tar.gz", members), "mergerec", "not a user id of umap.json"


def _mergerec_val_user_negative(tmp: Path) -> tuple[Path, str, str]:
    members = dict(MERGEREC_MEMBERS, **{"val.json": {"0": [4], "-1": [1]}})
    # must not give user 2 a target
    return make_mergerec(tmp / "Toy.tar.gz", members), "mergerec", "not a user id of umap.json"


def _seqrec_more_timestamps_than_items(tmp: Path) -> tuple[Path, str, str]:
    users = SEQREC_USERS.copy()
    users.at[0, "Timestamp"] = [1, 2, 3, 4, 5, 6]
    return make_seqrec(tmp / "proc.zip", users=users), "seqrec-zip", "has 4 items but 6 timestamps"


def _seqrec_fewer_timestamps_than_items(tmp: Path) -> tuple[Path, str, str]:
    users = SEQREC_USERS.copy()
    users.at[0, "Timestamp"] = [1, 2]
    # must not silently drop items 102 and 103
    return make_seqrec(tmp / "proc.zip", users=users), "seqrec-zip", "has 4 items but 2 timestamps"


BAD_INPUTS.update(
    {
        "seqrec-corrupt-deflate": _seqrec_corrupt_deflate,
        "seqrec-directory": _seqrec_directory,
        "mergerec-val-user-out-of-range": _mergerec_val_user_out_of_range,
        "mergerec-val-user-negative": _mergerec_val_user_negative,
        "seqrec-more-timestamps-than-items": _seqrec_more_timestamps_than_items,
        "seqrec-fewer-timestamps-than-items": _seqrec_fewer_timestamps_than_items,
    }
)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_leaves_no_files(
    case: str, tmp_path: Path, cache: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path, fmt, phrase = BAD_INPUTS[case](src)
    with pytest.raises(FedmergeError) as err:
        import_domain(path, fmt, "mine", allow_pickle=True)
    assert phrase in str(err.value)
    assert cache_files(cache) == []


def test_unpinned_seqrec_without_allow_pickle_leaves_no_files(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(FedmergeError, match="--allow-pickle"):
        import_domain(make_seqrec(tmp_path / "proc.zip"), "seqrec-zip", "mine")
    assert cache_files(cache) == []


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("beauty", "'beauty' is a built-in domain name"),
        ("synth-2", "'synth-2' is a built-in domain name"),
        ("Bad Name", "domain name 'Bad Name' is not allowed"),
        ("-dash", "domain name '-dash' is not allowed"),
    ],
)
def test_bad_import_name_is_rejected(name: str, phrase: str, tmp_path: Path, cache: Path) -> None:
    path = make_mergerec(tmp_path / "Toy.tar.gz")
    with pytest.raises(FedmergeError) as err:
        import_domain(path, "mergerec", name)
    assert phrase in str(err.value)
    assert cache_files(cache) == []


# --------------------------------------------------------------------------------------------
# import_domain -> load_domain
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mergerec", "seqrec-zip", "recbole"])
def test_import_then_load_gives_the_same_domain(fmt: str, tmp_path: Path, cache: Path) -> None:
    builders = {
        "mergerec": lambda: make_mergerec(tmp_path / "Toy.tar.gz"),
        "seqrec-zip": lambda: make_seqrec(tmp_path / "proc.zip"),
        "recbole": lambda: make_recbole(tmp_path / "rb"),
    }
    path = builders[fmt]()
    imported = import_domain(path, fmt, "my-data.v1", allow_pickle=True)
    assert imported.name == "my-data.v1"

    assert cache_files(cache) == [
        "imported/my-data.v1/arrays.npz",
        "imported/my-data.v1/domain.json",
    ]
    assert imported_names() == ["my-data.v1"]
    loaded = load_domain("my-data.v1")
    assert loaded.name == "my-data.v1"
    assert_same_domain(loaded, imported)
    assert loaded.source == imported.source
    assert loaded.summary() == imported.summary()
    assert cache_files(cache) == [
        "imported/my-data.v1/arrays.npz",
        "imported/my-data.v1/domain.json",
    ]


def test_reimport_with_replace_replaces_the_previous_import(tmp_path: Path, cache: Path) -> None:
    import_domain(make_recbole(tmp_path / "rb"), "recbole", "mine")
    second = import_domain(make_mergerec(tmp_path / "Toy.tar.gz"), "mergerec", "mine", replace=True)
    assert cache_files(cache) == ["imported/mine/arrays.npz", "imported/mine/domain.json"]
    assert_same_domain(load_domain("mine"), second)
    assert load_domain("mine").n_users == 3 and load_domain("mine").item_ids[0] == "B005"


def test_write_recbole_rejects_a_tab_in_an_id_and_leaves_nothing(tmp_path: Path) -> None:
    domain = from_sequences("t", ["a\tb", "c"], {}, ["u"], [[0, 1]])
    with pytest.raises(FedmergeError, match=r"item id .* holds whitespace"):
        write_recbole(domain, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_inter_row_without_item_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "rb"
    folder.mkdir()
    (folder / "x.inter").write_text("user_id:token\titem_id:token\nu1\ti1\nu2\t\n")
    with pytest.raises(FedmergeError, match="line 3: empty item_id"):
        read_recbole(folder, "x")


# --------------------------------------------------------------------------------------------
# Hostile or careless input: one clear error, read faithfully, nothing half-written
# --------------------------------------------------------------------------------------------


class _WritesMarker:
    """A pickle that, when loaded, creates `marker` (what an attacker's payload would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def make_evil_zip(path: Path, marker: Path) -> Path:
    """A proc.zip whose user2item.pkl runs code (creates `marker`) when unpickled."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("proc/user2item.pkl", pickle.dumps(_WritesMarker(marker)))
        archive.writestr("proc/item2title.pkl", pickle.dumps(_WritesMarker(marker)))
    return path


def test_seqrec_file_swapped_after_the_sha256_check_is_never_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker replaces a pinned proc.zip by a malicious one between the check and the read."""
    path = make_seqrec(tmp_path / "proc.zip")
    good_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    marker, evil = tmp_path / "pwned", make_evil_zip(tmp_path / "evil.zip", tmp_path / "pwned")
    checks = []

    class SwapOnCheck(frozenset):
        def __contains__(self, digest: object) -> bool:
            checks.append(digest)
            os.replace(evil, path)  # swapped right after the hash was taken
            return super().__contains__(digest)

    monkeypatch.setattr(seqrec, "PINNED_SHA256", SwapOnCheck({good_digest}))
    # no --allow-pickle: only the pinned content may be unpickled
    domain = read_seqrec_zip(path, "mine")

    assert checks == [good_digest]
    assert not marker.exists()
    # the file on disk is the evil one now
    assert hashlib.sha256(path.read_bytes()).hexdigest() != good_digest
    assert domain.source["sha256"] == good_digest
    assert (domain.n_users, domain.n_items, domain.n_interactions) == (4, 5, 11)


def test_unpinned_evil_seqrec_is_not_unpickled_without_allow_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(FedmergeError, match="--allow-pickle"):
        read_archive(make_evil_zip(tmp_path / "proc.zip", marker), "seqrec-zip", "mine")
    assert not marker.exists()


def test_seqrec_archive_over_the_size_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_seqrec(tmp_path / "proc.zip")
    monkeypatch.setattr(safe_io, "MAX_ARCHIVE_BYTES", path.stat().st_size - 1)
    with pytest.raises(
        FedmergeError, match=f"proc.zip is larger than {path.stat().st_size - 1:,} bytes"
    ):
        read_seqrec_zip(path, "mine", allow_pickle=True)
    monkeypatch.setattr(safe_io, "MAX_ARCHIVE_BYTES", path.stat().st_size)
    assert read_seqrec_zip(path, "mine", allow_pickle=True).n_users == 4


def test_seqrec_member_over_the_size_cap_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_seqrec(tmp_path / "proc.zip")
    with zipfile.ZipFile(path) as archive:
        size = archive.getinfo("proc/user2item.pkl").file_size
    monkeypatch.setattr(safe_io, "MAX_MEMBER_BYTES", size - 1)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a member over the cap was opened")

    monkeypatch.setattr(zipfile.ZipFile, "open", never)
    with pytest.raises(
        FedmergeError,
        match=f"member user2item.pkl unpacks to {size:,} bytes, more than the {size - 1:,}",
    ):
        read_seqrec_zip(path, "mine", allow_pickle=True)


def test_mergerec_member_over_the_size_cap_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = dict(
        MERGEREC_MEMBERS,
        **{"meta_data.json": b" " * 5000 + json.dumps(MERGEREC_MEMBERS["meta_data.json"]).encode()},
    )
    path = make_mergerec(tmp_path / "Toy.tar.gz", members)
    monkeypatch.setattr(safe_io, "MAX_MEMBER_BYTES", 4096)
    extracted = []
    real_extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(
        tarfile.TarFile,
        "extractfile",
        lambda self, member: extracted.append(member.name) or real_extract(self, member),
    )
    with pytest.raises(
        FedmergeError, match=r"member meta_data.json unpacks to 5,\d{3} bytes, more than the 4,096"
    ):
        read_mergerec(path, "toy")
    assert "Toy/meta_data.json" not in extracted


def _mergerec_with(**members: object) -> Callable[[Path], Path]:
    return lambda tmp: make_mergerec(tmp / "Toy.tar.gz", dict(MERGEREC_MEMBERS, **members))


def _recbole_with(
    inter: str = RECBOLE_INTER, item: str | None = RECBOLE_ITEM
) -> Callable[[Path], Path]:
    return lambda tmp: make_recbole(tmp / "rb", inter=inter, item=item)


def _seqrec_with(
    users: pd.DataFrame = SEQREC_USERS, titles: pd.DataFrame = SEQREC_TITLES
) -> Callable[[Path], Path]:
    return lambda tmp: make_seqrec(tmp / "proc.zip", users=users, titles=titles)


def _users_with(**columns: object) -> pd.DataFrame:
    users = SEQREC_USERS.copy()
    for column, value in columns.items():
        users[column] = value
    return users


def _recbole_latin1(tmp: Path) -> Path:
    folder = make_recbole(tmp / "rb")
    (folder / "x.item").write_bytes(RECBOLE_ITEM.replace("Red", "R\xe9d").encode("latin-1"))
    return folder


_HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"
UNREADABLE: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    # RecBole: a tab or a line break inside a title must not shift columns or invent items
    "recbole-tab-in-title": (
        _recbole_with(item=RECBOLE_ITEM.replace("Blue Hat", "Blue\tHat")),
        "recbole",
        "x.item, line 3: 5 tab-separated fields where the header has 4",
    ),
    "recbole-newline-in-title": (
        _recbole_with(item=RECBOLE_ITEM.replace("Blue Hat", "Blue\nHat")),
        "recbole",
        "x.item, line 3: 2 tab-separated fields where the header has 4",
    ),
    "recbole-short-inter-row": (
        _recbole_with(inter=_HEADER + "u1\ti1\t5\nu1\ti2\n"),
        "recbole",
        "x.inter, line 3: 2 tab-separated fields where the header has 3",
    ),
    "recbole-nan-timestamp": (
        _recbole_with(inter=_HEADER + "u1\ti1\t5\nu1\ti2\tnan\n"),
        "recbole",
        "x.inter, line 3: timestamp 'nan' is not a finite number",
    ),
    "recbole-inf-timestamp": (
        _recbole_with(inter=_HEADER + "u1\ti1\t-inf\n"),
        "recbole",
        "x.inter, line 2: timestamp '-inf' is not a finite number",
    ),
    "recbole-empty-timestamp": (
        _recbole_with(inter=_HEADER + "u1\ti1\t\n"),
        "recbole",
        "x.inter, line 2: timestamp '' is not a finite number",
    ),
    "recbole-header-only": (
        _recbole_with(inter=_HEADER),
        "recbole",
        "x.inter holds no interactions (0 users, 0 interactions)",
    ),
    "recbole-not-utf8": (_recbole_latin1, "recbole", "x.item, line 2: the text is not UTF-8"),
    "recbole-empty-item-id": (
        _recbole_with(item=RECBOLE_ITEM + "\tNo Id\tX\tY\n"),
        "recbole",
        "x.item, line 6: empty item_id",
    ),
    # MergeRec
    "mergerec-float-item": (
        _mergerec_with(**{"train.json": {"2": [2], "0": [1.5, 2, 3], "1": [4, 0]}}),
        "mergerec",
        "train.json gives user 0 ('rev-a') [1.5, 2, 3], not a list of integer item ids",
    ),
    "mergerec-string-smap-id": (
        _mergerec_with(**{"smap.json": {"B005": 0, "A001": "1", "C003": 2, "A002": 3, "Z999": 4}}),
        "mergerec",
        "item 'A001' maps to '1', which is not an integer id",
    ),
    "mergerec-two-test-targets": (
        _mergerec_with(**{"test.json": {"1": [3], "0": [0, 2]}}),
        "mergerec",
        "test.json gives user 0 ('rev-a') 2 targets",
    ),
    "mergerec-non-canonical-user": (
        _mergerec_with(**{"val.json": {"0": [4], "01": [1]}}),
        "mergerec",
        "val.json has user '01', which is not a user id of umap.json",
    ),
    "mergerec-unicode-digit-user": (
        _mergerec_with(**{"val.json": {"0": [4], "\u0661": [1]}}),
        "mergerec",
        "which is not a user id of umap.json",
    ),
    "mergerec-huge-item": (
        _mergerec_with(**{"test.json": {"1": [3], "0": [2**70]}}),
        "mergerec",
        f"test.json gives user 0 item {2**70}, which refers to an item outside 0..4",
    ),
    "mergerec-empty-metadata": (
        _mergerec_with(**{"meta_data.json": {}}),
        "mergerec",
        "meta_data.json describes none of the 5 items of smap.json",
    ),
    "mergerec-metadata-not-objects": (
        _mergerec_with(**{"meta_data.json": {"B005": "Lipstick"}}),
        "mergerec",
        "meta_data.json's entry for item 'B005' is not an object",
    ),
    "mergerec-train-is-a-list": (
        _mergerec_with(**{"train.json": [[1, 2]]}),
        "mergerec",
        "train.json holds a JSON list, not an object",
    ),
    "mergerec-no-users": (
        _mergerec_with(**{"umap.json": {}, "train.json": {}, "val.json": {}, "test.json": {}}),
        "mergerec",
        "holds no interactions (0 users, 0 interactions)",
    ),
    # SeqRecBenchmark
    "seqrec-float-item": (
        _seqrec_with(
            users=_users_with(
                ItemID=[[100, 101.5, 102, 103], [103, 100, 101, 102], [101, 100], [103]]
            )
        ),
        "seqrec-zip",
        "user row 0's ItemID holds the id 101.5, which is not an integer",
    ),
    "seqrec-string-user": (
        _seqrec_with(users=_users_with(UserID=["1", "2", "3", "4"])),
        "seqrec-zip",
        "UserID column holds the id '1', which is not an integer",
    ),
    "seqrec-repeated-user": (
        _seqrec_with(users=_users_with(UserID=[1, 2, 1, 4])),
        "seqrec-zip",
        "user 1 has 2 rows in user2item.pkl",
    ),
    "seqrec-repeated-item": (
        _seqrec_with(
            titles=pd.DataFrame({"ItemID": [103, 100, 102, 101, 100], "Title": list("abcde")})
        ),
        "seqrec-zip",
        "item 100 has 2 rows in item2title.pkl",
    ),
    "seqrec-no-titles": (
        _seqrec_with(titles=SEQREC_TITLES.iloc[:0]),
        "seqrec-zip",
        "item2title.pkl holds no items",
    ),
    "seqrec-nan-timestamp": (
        _seqrec_with(
            users=_users_with(Timestamp=[[10, 20, float("nan"), 40], [50, 10, 50, 20], [5, 6], [7]])
        ),
        "seqrec-zip",
        "user row 0 has a timestamp that is not a finite number",
    ),
    "seqrec-user-without-items": (
        _seqrec_with(
            users=_users_with(
                ItemID=[[100, 101, 102, 103], [103, 100, 101, 102], [101, 100], []],
                Timestamp=[[1, 2, 3, 4], [1, 2, 3, 4], [1, 2], []],
            )
        ),
        "seqrec-zip",
        "user '4' has no interactions",
    ),
    "seqrec-no-users": (
        _seqrec_with(users=SEQREC_USERS.iloc[:0]),
        "seqrec-zip",
        "holds no interactions (0 users, 0 interactions)",
    ),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_input_that_cannot_be_read_faithfully_is_refused(
    case: str, tmp_path: Path, cache: Path
) -> None:
    build, fmt, phrase = UNREADABLE[case]
    src = tmp_path / "src"
    src.mkdir()
    path = build(src)
    with pytest.raises(FedmergeError) as err:
        import_domain(path, fmt, "mine", allow_pickle=True)
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)
    assert cache_files(cache) == []


def test_recbole_exact_duplicate_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    """A row logged twice must not turn a test target into a history item."""
    lines = RECBOLE_INTER.splitlines(keepends=True)
    # u2-i3 twice more, u1-i1 once
    doubled = lines[0] + "".join(lines[1:]) + lines[1] + lines[2] + lines[1]
    clean = read_recbole(make_recbole(tmp_path / "a"), "rb")
    got = read_recbole(make_recbole(tmp_path / "b", inter=doubled), "rb")
    assert_same_domain(got, clean)
    assert got.n_interactions == 7
    assert got.source["duplicate_rows_dropped"] == "3"
    assert "duplicate_rows_dropped" not in clean.source
    # the same user and item at another time is a repeat interaction, kept
    repeat = read_recbole(make_recbole(tmp_path / "c", inter=RECBOLE_INTER + "u3\ti2\t11\n"), "rb")
    np.testing.assert_array_equal(repeat.test[repeat.user_ids.index("u3")], 1)
    assert repeat.n_interactions == 8


def test_recbole_crlf_lines_are_read(tmp_path: Path) -> None:
    crlf = read_recbole(
        make_recbole(
            tmp_path / "a",
            inter=RECBOLE_INTER.replace("\n", "\r\n"),
            item=RECBOLE_ITEM.replace("\n", "\r\n"),
        ),
        "rb",
    )
    assert_same_domain(crlf, read_recbole(make_recbole(tmp_path / "b"), "rb"))


def test_recbole_export_of_a_title_with_tab_and_newline_round_trips(tmp_path: Path) -> None:
    """Export collapses whitespace inside text (tab-separated lines cannot carry it).

    All else survives.
    """
    domain = from_sequences(
        "t",
        ["a", "b", "c"],
        {"title": ["Red\tShoe\nsize 9", "Hat", "  "], "brand": ["Ac\r\nme", "", "B"]},
        ["u1", "u2"],
        [[0, 1, 2, 0], [2, 1]],
    )
    write_recbole(domain, tmp_path / "out")
    lines = (tmp_path / "out" / "t.item").read_text().split("\n")
    assert lines[:4] == [
        "item_id:token\ttitle:token_seq\tbrand:token",
        "a\tRed Shoe size 9\tAc me",
        "b\tHat\t",
        "c\t\tB",
    ]
    back = read_recbole(tmp_path / "out", "t")
    assert back.item_text == {"title": ["Red Shoe size 9", "Hat", ""], "brand": ["Ac me", "", "B"]}
    assert (back.n_items, back.n_users, back.n_interactions) == (3, 2, 6)
    for key in ("train_offsets", "train_items", "valid", "test"):
        np.testing.assert_array_equal(getattr(back, key), getattr(domain, key))


# --------------------------------------------------------------------------------------------
# Importing under a taken name
# --------------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in cache_files(root)}


def test_import_under_a_taken_name_is_refused_without_replace(tmp_path: Path, cache: Path) -> None:
    rb = make_recbole(tmp_path / "rb")
    import_domain(rb, "recbole", "mine")
    before = _snapshot(cache)
    with pytest.raises(FedmergeError) as err:
        import_domain(make_mergerec(tmp_path / "Toy.tar.gz"), "mergerec", "mine")
    assert (
        str(err.value)
        == f"mine is already imported (from {rb / 'x.inter'}); pass --replace to replace it"
    )
    assert _snapshot(cache) == before


def test_failing_reimport_with_replace_keeps_the_old_import_byte_for_byte(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_domain(make_recbole(tmp_path / "rb"), "recbole", "mine")
    before = _snapshot(cache)
    assert sorted(before) == ["imported/mine/arrays.npz", "imported/mine/domain.json"]
    with pytest.raises(FedmergeError, match="truncated or corrupt"):
        import_domain(
            truncated(make_mergerec(tmp_path / "Toy.tar.gz")), "mergerec", "mine", replace=True
        )
    assert _snapshot(cache) == before

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)  # the new import parses, then its write fails
    with pytest.raises(
        FedmergeError, match=r"cannot write .*imported/mine/arrays.npz: the disk is full"
    ):
        import_domain(make_mergerec(tmp_path / "Toy.tar.gz"), "mergerec", "mine", replace=True)
    assert _snapshot(cache) == before
    assert load_domain("mine").user_ids == ["u3", "u2", "u1"]


def test_cli_import_refuses_a_taken_name_and_replaces_with_replace(
    tmp_path: Path, cache: Path
) -> None:
    from typer.testing import CliRunner

    from fedmerge.cli import app

    runner = CliRunner()
    args = [
        "data",
        "import",
        str(make_mergerec(tmp_path / "Toy.tar.gz")),
        "--format",
        "mergerec",
        "--name",
        "mine",
    ]
    assert runner.invoke(app, args).exit_code == 0
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, FedmergeError) and "pass --replace" in str(
        refused.exception
    )
    replaced = runner.invoke(app, [*args, "--replace"])
    assert (
        replaced.exit_code == 0
        and "imported mine: 3 users, 5 items, 10 interactions" in replaced.output
    )


# --------------------------------------------------------------------------------------------
# Paths that are not regular files: refused at once, never read (a FIFO would block forever)
# --------------------------------------------------------------------------------------------


def _import_within(seconds: float, *args: object, **kwargs: object) -> BaseException | None:
    """Run import_domain in a thread.

    Fail the test (instead of hanging) if it does not return in time.
    """
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            import_domain(*args, **kwargs)  # type: ignore[arg-type]
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"import_domain did not return within {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("fmt", ["mergerec", "seqrec-zip", "recbole"])
def test_fifo_as_archive_is_refused_without_hanging(fmt: str, tmp_path: Path, cache: Path) -> None:
    fifo = tmp_path / "archive"
    os.mkfifo(fifo)
    err = _import_within(10, fifo, fmt, "mine", allow_pickle=True)
    assert isinstance(err, FedmergeError)
    assert str(err).startswith(
        f"{fifo} is not a regular file but a FIFO (named pipe); give the path of a"
    )
    assert cache_files(cache) == []


def test_fifo_inside_a_recbole_folder_is_refused_without_hanging(
    tmp_path: Path, cache: Path
) -> None:
    folder = make_recbole(tmp_path / "rb", item=None)
    os.mkfifo(folder / "x.item")
    err = _import_within(10, folder, "recbole", "mine")
    assert isinstance(err, FedmergeError)
    assert str(err).startswith(f"{folder / 'x.item'} is not a regular file but a FIFO (named pipe)")
    assert cache_files(cache) == []


def test_device_as_archive_is_refused(cache: Path) -> None:
    with pytest.raises(
        FedmergeError, match="/dev/null is not a regular file but a character device"
    ):
        import_domain(Path("/dev/null"), "mergerec", "mine")
    assert cache_files(cache) == []


def test_leftover_temporary_folder_of_a_killed_import_is_not_a_domain(
    tmp_path: Path, cache: Path
) -> None:
    import_domain(make_mergerec(tmp_path / "Toy.tar.gz"), "mergerec", "mine")
    leftover = cache / "imported" / ".other.tmp-x1y2"  # an import killed after writing its files
    leftover.mkdir()
    for file in ("arrays.npz", "domain.json"):
        (leftover / file).write_bytes((cache / "imported" / "mine" / file).read_bytes())
    assert imported_names() == ["mine"]
