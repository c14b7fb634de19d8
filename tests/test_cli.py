"""The command line contract: JSON outputs, metric files, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedmerge.runs.results import write_metrics


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"FEDMERGE_DATA": str(cache), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedmerge", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_info_json_counts(tmp_path: Path) -> None:
    out = run_cli("data", "info", "synth-0", "--json", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["users"], info["items"]) == (400, 200)
    assert info["interactions"] > 0 and info["text_fields"] == ["brand", "category", "title"]


def test_list_json_has_every_domain(tmp_path: Path) -> None:
    rows = json.loads(run_cli("data", "list", "--json", cache=tmp_path).stdout)
    assert [r["name"] for r in rows] == [
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
    assert all(len(r["sha256"]) == 64 and r["url"].startswith("https://") for r in rows)


def test_evaluate_writes_metric_rows(tmp_path: Path) -> None:
    out = run_cli(
        "evaluate",
        "--domain",
        "synth-0,synth-1",
        "--baseline",
        "popularity",
        "--out",
        str(tmp_path / "run"),
        cache=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [(r["model"], r["domain"], r["split"]) for r in rows] == [
        ("popularity", "synth-0", "valid"),
        ("popularity", "synth-0", "test"),
        ("popularity", "synth-1", "valid"),
        ("popularity", "synth-1", "test"),
    ]
    for row in rows:
        assert {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (1, 5, 10, 20, 50)} <= set(
            row
        )
        assert (
            0 < row["ndcg@10"] <= row["recall@10"] <= row["recall@50"] <= 1 and row["users"] == 400
        )
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["model", "domain", "split", "recall@1"]
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 5
    assert "popularity" in out.stdout and "synth-1" in out.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    cases = [
        (("data", "info", "bookz"), "unknown domain 'bookz'; known domains: beauty"),
        (
            ("evaluate", "--domain", "synth-0,synth-0", "--baseline", "popularity"),
            "names a domain twice",
        ),
        (("evaluate", "--domain", "synth-0"), "give either --baseline NAME or --checkpoint DIR"),
        (("evaluate", "--domain", "synth-0", "--baseline", "oracle"), "unknown baseline 'oracle'"),
        (
            (
                "data",
                "import",
                str(tmp_path / "missing.zip"),
                "--format",
                "seqrec-zip",
                "--name",
                "mine",
            ),
            "does not exist",
        ),
        (("data", "download"), "name the domains to download, or pass --all"),
    ]
    for args, message in cases:
        out = run_cli(*args, cache=tmp_path / "cache")
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_write_metrics_replaces_files_atomically(tmp_path: Path) -> None:
    rows = [{"model": "m", "domain": "d", "split": "test", "recall@10": 0.5}]
    write_metrics(rows, tmp_path)
    write_metrics(rows * 2, tmp_path)
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.json"]
