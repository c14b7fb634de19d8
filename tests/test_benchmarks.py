"""Benchmark bookkeeping that decides whether a recorded measurement is read back or rerun."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedmerge.config import load_config
from fedmerge.files import write_json
from fedmerge.train.config import ExperimentConfig

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_merge_benchmark_matches_a_recorded_seed_on_its_resolved_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import merge_quality

    args = argparse.Namespace(
        tables=tmp_path,
        domains=["beauty", "pantry"],
        pretrain="steam,games",
        steps=500,
        only=None,
        overrides=[],
    )
    # Recorded before the preset kept a weight average, with no --set at all.
    without_average = merge_quality._preset(
        load_config("textseq", ["train.ema=null"], ExperimentConfig).model_dump(mode="json")
    )
    record = {
        "base": "seeded",
        "seed": 0,
        "table": dict.fromkeys(merge_quality.MEASURED, {}),
        "lambdas": {},
        "settings": {
            "domains": args.domains,
            "pretrain": args.pretrain,
            "steps": 500,
            "overrides": [],
            "config": without_average,
        },
    }
    write_json(tmp_path / "seeded-seed0.json", record)
    with pytest.raises(SystemExit, match="seeded-seed0.json was measured with another config;"):
        merge_quality.seed_record("seeded", 0, args)  # today's preset averages the weights
    # the same resolved config, spelt with a --set the record lacks
    args.overrides = ["train.ema=null"]
    assert merge_quality.seed_record("seeded", 0, args) == record
    args.steps = 300
    with pytest.raises(SystemExit, match="measured with another steps;"):
        merge_quality.seed_record("seeded", 0, args)
    args.steps = 500
    del record["table"]["ties"]  # a row added since the record: --report reads the record as it is
    write_json(tmp_path / "seeded-seed0.json", record)
    assert merge_quality.seed_record("seeded", 0, args, report=True) == record


def test_a_recorded_pretrained_seed_reads_back_only_with_the_pretraining_it_was_measured_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records written before ``pretrain`` froze all but the adaptor pretrained everything.

    That is, ``train.frozen=[]``.
    """
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import merge_quality

    args = argparse.Namespace(
        tables=tmp_path,
        domains=["beauty", "pantry"],
        pretrain="steam,games",
        steps=500,
        only=None,
        overrides=["train.ema=null"],
    )
    config = merge_quality._preset(
        load_config("textseq", args.overrides, ExperimentConfig).model_dump(mode="json")
    )
    record = {
        "base": "pretrained",
        "seed": 0,
        "table": dict.fromkeys(merge_quality.MEASURED, {}),
        "lambdas": {},
        "settings": {
            "domains": args.domains,
            "pretrain": args.pretrain,
            "steps": 500,
            "overrides": [],
            "config": config,
        },
    }
    write_json(tmp_path / "pretrained-seed0.json", record)
    with pytest.raises(
        SystemExit, match="pretrained-seed0.json was measured with another pretrain config;"
    ):
        # today's pretraining trains the adaptor only
        merge_quality.seed_record("pretrained", 0, args)
    # fine-tuning is unchanged by it: frozen is [] there
    args.overrides = ["train.ema=null", "train.frozen=[]"]
    assert merge_quality.seed_record("pretrained", 0, args) == record


def test_a_record_of_chosen_rows_reads_back_for_those_rows_and_names_a_cut_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import merge_quality

    args = argparse.Namespace(
        tables=tmp_path,
        domains=["pantry"],
        pretrain="steam",
        steps=500,
        overrides=[],
        only=["oracle"],
    )
    config = merge_quality._preset(
        load_config("textseq", [], ExperimentConfig).model_dump(mode="json")
    )
    record = {
        "base": "seeded",
        "seed": 0,
        "table": {"oracle": {"pantry": [0.1, 0.05]}},
        "lambdas": {"ties (lambda on valid)": 0.7},
        "settings": {
            "domains": ["pantry"],
            "pretrain": "steam",
            "steps": 500,
            "overrides": [],
            "config": config,
        },
        "trainings": {
            "pantry": "time limit of 14.0 minutes",
            "joint": "early stop: no better valid",
        },
        "machine": "x86_64, 2 CPUs",
        "date": "2026-12-06",
    }
    write_json(tmp_path / "seeded-seed0.json", record)
    assert (
        merge_quality.seed_record("seeded", 0, args) == record
    )  # no other row asked: not measured
    assert merge_quality._measured(record) == (
        "seed 0: 2026-12-06, x86_64, 2 CPUs, ties lambda 0.7, stopped by the time limit: pantry"
    )


def test_the_summary_says_which_rows_fewer_seeds_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import merge_quality

    both = {"a": (0.1, 0.05), "b": (0.3, 0.1)}
    tables = [{"ties": both, "new": both}, {"ties": {"a": (0.3, 0.05), "b": (0.5, 0.1)}}]
    ties, new = merge_quality._summary(tables, ["a", "b"])
    assert ties["model"] == "ties" and ties["average recall@10"] == pytest.approx((0.3, 0.1))
    assert new["model"] == "new (1 of 2 seeds)" and new["average recall@10"] == pytest.approx(
        (0.2, 0.0)
    )


def test_measuring_one_seed_writes_the_table_of_every_recorded_seed_of_both_regimes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import merge_quality

    def measured(base_kind: str, seed: int, args: argparse.Namespace) -> tuple[dict, dict]:
        recall = 0.1 + seed / 10
        return {"ties": {"a": (recall, 0.05), "b": (recall, 0.05)}}, {"method": 0.3, "usage": 0.3}

    monkeypatch.setattr(merge_quality, "run_seed", measured)
    tables, out = tmp_path / "tables", tmp_path / "out"
    common = ["merge_quality.py", "--domains", "a,b", "--tables", str(tables), "--out", str(out)]
    monkeypatch.setattr("sys.argv", [*common, "--seeds", "0", "--bases", "pretrained"])
    merge_quality.main()
    monkeypatch.setattr("sys.argv", [*common, "--seeds", "1,2", "--bases", "seeded"])
    merge_quality.main()
    text = (out / "merge_quality.md").read_text()
    seeded, pretrained = text.split("## seeded base")[1].split("## pretrained base")
    assert "seed 1:" in seeded and "seed 2:" in seeded and "seed 0:" not in seeded
    assert "| ties | 0.2500 ± 0.0500 |" in seeded  # seeds 1 and 2: recall 0.2 and 0.3
    assert "seed 0:" in pretrained and "| ties | 0.1000 ± 0.0000 |" in pretrained
