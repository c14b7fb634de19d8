"""Shared fixtures: an empty, private cache for every test that touches the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Flower offline: no update check, no telemetry, no dependency installation at run time.
for _key in ("FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh FEDMERGE_DATA folder for one test (the user's cache is never touched)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDMERGE_DATA", str(root))
    return root


def cache_files(root: Path) -> list[str]:
    """Every file below `root`, relative, sorted: to check that nothing half-written was left."""
    return (
        sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )
