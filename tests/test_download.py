"""Download cache: mirror URLs, sha256 check, atomic writes, clear errors."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmerge.data import catalog, download
from fedmerge.data.download import fetch, source_url
from fedmerge.data.registry import REGISTRY, DatasetSpec, get_spec
from fedmerge.data.synthetic import synthetic_domain
from fedmerge.errors import FedmergeError
from tests.conftest import cache_files


def _mirror_with(
    tmp_path: Path, spec: DatasetSpec, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A file:// mirror holding `payload` at `spec`'s path."""
    root = tmp_path / "mirror"
    (root / spec.path).parent.mkdir(parents=True)
    (root / spec.path).write_bytes(payload)
    monkeypatch.setenv("FEDMERGE_MIRROR", root.as_uri() + "/")
    return root


def _spec_for(payload: bytes) -> DatasetSpec:
    return dataclasses.replace(
        REGISTRY["pantry"], name="toy", sha256=hashlib.sha256(payload).hexdigest()
    )


def test_upstream_and_mirror_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = REGISTRY["books"]
    monkeypatch.delenv("FEDMERGE_MIRROR", raising=False)
    assert source_url(spec) == (
        "https://raw.githubusercontent.com/Tiny-Snow/SeqRecBenchmark-Datasets/main/"
        "data/amazon2014-book_1000000/proc.zip"
    )
    monkeypatch.setenv("FEDMERGE_MIRROR", "https://mirror.example/data")
    assert (
        source_url(spec)
        == "https://mirror.example/data/Tiny-Snow/SeqRecBenchmark-Datasets/data/amazon2014-book_1000000/proc.zip"
    )
    monkeypatch.setenv("FEDMERGE_MIRROR", "/not/a/url")
    with pytest.raises(FedmergeError, match="not a URL"):
        source_url(spec)


def test_registry_entries_are_complete() -> None:
    assert list(REGISTRY) == [
        "beauty",
        "sports",
        "toys",
        "pantry",
        "books",
        "movies",
        "games",
        "steam",
        "electronics",
    ]
    for spec in REGISTRY.values():
        assert len(spec.sha256) == 64 and spec.format in ("mergerec", "seqrec-zip") and spec.licence
        assert spec.url.startswith("https://raw.githubusercontent.com/") and "/main/" in spec.url
    with pytest.raises(FedmergeError, match="known domains"):
        get_spec("book")


def test_fetch_verifies_and_caches_once(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"archive bytes" * 1000
    spec = _spec_for(payload)
    mirror = _mirror_with(tmp_path, spec, payload, monkeypatch)
    path = fetch(spec, quiet=True)
    assert path.read_bytes() == payload and cache_files(cache) == [f"raw/{spec.path}"]
    (mirror / spec.path).unlink()  # a second fetch must not need the mirror
    assert fetch(spec, quiet=True) == path


def test_wrong_sha256_is_rejected_and_leaves_nothing(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec_for(b"the real archive")
    _mirror_with(tmp_path, spec, b"a tampered archive", monkeypatch)
    with pytest.raises(FedmergeError, match="sha256 .* expected .*corrupt, truncated or tampered"):
        fetch(spec, quiet=True)
    assert cache_files(cache) == []


def test_truncated_download_of_a_registered_domain(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated real archive from the mirror.

    sha256 mismatch, no cache entry, no parsed domain.
    """
    spec = REGISTRY["pantry"]
    _mirror_with(tmp_path, spec, b"\x1f\x8b" + b"\0" * 100, monkeypatch)
    with pytest.raises(FedmergeError, match="pantry: the archive"):
        catalog.load_domain("pantry", quiet=True)
    assert cache_files(cache) == []


def test_damaged_cache_file_is_downloaded_again(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"good"
    spec = _spec_for(payload)
    _mirror_with(tmp_path, spec, payload, monkeypatch)
    path = fetch(spec, quiet=True)
    path.write_bytes(b"bit rot")
    assert fetch(spec, quiet=True).read_bytes() == payload


def test_missing_mirror_file_is_a_clear_error(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMERGE_MIRROR", (tmp_path / "empty").as_uri() + "/")
    with pytest.raises(FedmergeError, match="cannot download beauty .*FEDMERGE_MIRROR"):
        fetch(REGISTRY["beauty"], quiet=True)
    assert cache_files(cache) == []


def test_unwritable_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setenv("FEDMERGE_DATA", str(locked))
    # root ignores permission bits: let the access check see what a user would
    if os.geteuid() == 0:
        monkeypatch.setattr(download.os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(FedmergeError, match="not readable and writable.*FEDMERGE_DATA"):
        download.cache_dir()


def test_cache_path_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FEDMERGE_DATA", str(blocker / "cache"))
    with pytest.raises(FedmergeError, match="cannot create the cache directory .*FEDMERGE_DATA"):
        download.cache_dir()


def test_synthetic_domains_need_no_cache(cache: Path) -> None:
    assert catalog.load_domain("synth-4").n_items == synthetic_domain("synth-4").n_items
    assert cache_files(cache) == []


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_files_of_killed_downloads_are_removed_live_ones_kept(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"good archive"
    spec = _spec_for(payload)
    _mirror_with(tmp_path, spec, payload, monkeypatch)
    final = download.archive_path(spec)
    final.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        stale = final.with_name(f".{final.name}.tmp-{dead}")  # kill -9 during a download left this
        # a concurrent download in progress
        live = final.with_name(f".{final.name}.tmp-{sleeper.pid}")
        # another archive's: not this fetch's business
        other = final.with_name(f".other.tar.gz.tmp-{dead}")
        odd = final.with_name(f".{final.name}.tmp-notapid")
        # maybe another machine's: too fresh
        recent = final.with_name(f".{final.name}.tmp-{_dead_pid()}")
        for path in (stale, live, other, odd, recent):
            path.write_bytes(b"half a download")
        hour_ago = time.time() - 3600
        for path in (stale, live, other, odd):
            os.utime(path, (hour_ago, hour_ago))

        assert fetch(spec, quiet=True).read_bytes() == payload
        assert not stale.exists()
        assert [p.exists() for p in (live, other, odd, recent)] == [True] * 4
        assert live.read_bytes() == b"half a download"
        assert sorted(p.name for p in final.parent.iterdir()) == sorted(
            [final.name, live.name, other.name, odd.name, recent.name]
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert download.remove_stale_temps(final) == [live]  # its process is gone now


def test_full_disk_during_download_names_the_file_and_leaves_nothing(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"x" * 5000
    spec = _spec_for(payload)
    _mirror_with(tmp_path, spec, payload, monkeypatch)

    def half_then_full(url: str, dest: Path, label: str, quiet: bool) -> None:
        dest.write_bytes(payload[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_download", half_then_full)
    with pytest.raises(FedmergeError) as err:
        fetch(spec, quiet=True)
    assert str(err.value).startswith(
        f"cannot write {download.archive_path(spec)}: the disk is full"
    )
    assert "free disk space or set FEDMERGE_DATA" in str(err.value)
    assert cache_files(cache) == []
