"""Every registered domain, downloaded from the mirror (or upstream), vs its published counts."""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

import pytest

from fedmerge.data import REGISTRY, load_domain
from fedmerge.evaluate import evaluate_domain
from fedmerge.evaluate.popularity import popularity_scorer

pytestmark = pytest.mark.realdata


def _reachable() -> bool:
    if os.environ.get("FEDMERGE_MIRROR"):
        return True
    try:
        urllib.request.urlopen(REGISTRY["pantry"].url, timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module", autouse=True)
def _need_data() -> None:
    if not _reachable():
        pytest.skip("no FEDMERGE_MIRROR set and the upstream host is unreachable")


def _mirror_readme_counts() -> dict[str, tuple[int, int, int]]:
    """Users / items / interactions per archive path, from the mirror's README table.

    Only for file:// mirrors.
    """
    mirror = os.environ.get("FEDMERGE_MIRROR", "")
    readme = Path(mirror.removeprefix("file://")) / "README.md"
    if not mirror.startswith("file://") or not readme.exists():
        return {}
    counts = {}
    for path, users, items, inter in re.findall(
        r"^\| (\S+) \| [^|]+ \| ([\d,]+) / ([\d,]+) / ([\d,]+) \|", readme.read_text(), re.M
    ):
        key = path.split("/data/")[-1] if path.startswith("...") else path
        counts[key] = tuple(int(x.replace(",", "")) for x in (users, items, inter))
    return counts


@pytest.mark.parametrize("name", list(REGISTRY))
def test_domain_counts_match_published(name: str) -> None:
    domain = load_domain(name, quiet=True)
    summary = domain.summary()
    assert (summary["users"], summary["items"], summary["interactions"]) == REGISTRY[name].expected
    published = _mirror_readme_counts()
    key = next((k for k in published if REGISTRY[name].path.endswith(k)), None)
    if key is not None:
        assert REGISTRY[name].expected == published[key]
    assert all(len(v) == domain.n_items for v in domain.item_text.values())
    assert sum(bool(t) for t in domain.item_text["title"]) > 0.9 * domain.n_items


def test_mirror_table_covers_eight_domains() -> None:
    if os.environ.get("FEDMERGE_MIRROR", "").startswith("file://"):
        assert len(_mirror_readme_counts()) == 8  # electronics' counts live in its summary.json


def test_mergerec_split_is_taken_as_published() -> None:
    pantry = load_domain("pantry", quiet=True)
    # as documented upstream
    assert int((pantry.valid < 0).sum()) == 2 and int((pantry.test < 0).sum()) == 2
    beauty = load_domain("beauty", quiet=True)
    assert int((beauty.test >= 0).sum()) == beauty.n_users == 22363


def test_popularity_beats_chance_on_beauty() -> None:
    beauty = load_domain("beauty", quiet=True)
    metrics = evaluate_domain(popularity_scorer, beauty, "test")
    assert metrics["users"] == 22363
    # 10x chance
    assert 0.005 < metrics["recall@10"] < 0.05 and metrics["recall@10"] > 10 * 10 / beauty.n_items
