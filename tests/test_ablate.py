"""The privacy ablation: its grid, its table, the kept local trainings, resuming, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import fedmerge.ablate.cache as training_cache
import fedmerge.ablate.run as runner
from fedmerge.ablate import (
    AblateConfig,
    default_out,
    load_training,
    plan,
    run_ablation,
    save_training,
    training_key,
)
from fedmerge.config import load_config
from fedmerge.errors import FedmergeError
from fedmerge.privacy import Ledger
from fedmerge.protocol import FederationConfig, TrainReply
from tests.test_pipeline import TINY

DOMAINS = ["synth-0", "synth-1"]
FAST = [*TINY, "train.epochs=1", "merge.learn.steps=5"]
IMPOSSIBLE = "not possible: central-dp noises only a plain mean"


def ablation_file(tmp_path: Path) -> Path:
    """A small ablation of an empty preset (the defaults) on the synthetic domains."""
    preset = tmp_path / "preset.toml"
    preset.write_text("")
    path = tmp_path / "ablate.toml"
    path.write_text(
        f"preset = {json.dumps(str(preset))}\n"
        f"domains = {json.dumps(DOMAINS)}\n"
        'settings = ["update-dp", "central-dp"]\n'
        "epsilons = [8.0]\n"
        'methods = ["average", "ties", "learned"]\n'
        "seeds = [0]\n"
        f"set = {json.dumps(FAST)}\n"
    )
    return path


def count_calls(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str) -> list[Any]:
    """Record each call of ``module.NAME`` (its arguments), then make it."""
    calls: list[Any] = []
    original = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def events(folder: Path) -> list[str]:
    lines = (folder / "events.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


def test_grid_table_shared_training_and_resume(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainings = count_calls(monkeypatch, training_cache, "party_train")
    runs = count_calls(monkeypatch, runner, "simulate")
    config = load_config(ablation_file(tmp_path), [], AblateConfig)
    out, said = tmp_path / "ablation", []
    rows = run_ablation(config, out, said.append)

    cells = [("none", math.inf), ("update-dp", 8.0), ("central-dp", 8.0)]
    methods = ["average", "ties", "learned"]
    # theta_0's rows first: the untrained start every run shares
    expected = [("none", math.inf, "theta_0", d) for d in DOMAINS] + [
        (s, e, m, d) for s, e in cells for m in methods for d in DOMAINS
    ]
    assert [(r["setting"], r["epsilon_target"], r["method"], r["domain"]) for r in rows] == expected
    with open(out / "ablate.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["setting"], r["epsilon_target"], r["method"], r["domain"]) for r in table] == [
        (s, "inf" if math.isinf(e) else "8.0", m, d) for s, e, m, d in expected
    ]
    base = {r["domain"]: r["recall@10"] for r in rows if r["method"] == "theta_0"}
    runs_json = json.loads(
        (out / "runs" / "none-epsinf-average-seed0" / "metrics.json").read_text()
    )
    assert base == {
        m["domain"]: m["recall@10"]
        for m in runs_json
        if m["model"] == "theta_0" and m["split"] == "test"
    }
    assert (out / "ablate.png").stat().st_size > 0
    assert "| update-dp | 8 | learned | 0 | synth-1 |" in (out / "ablate.md").read_text()
    for row in rows:
        if row["setting"] == "central-dp" and row["method"] != "average":
            assert row["note"] == IMPOSSIBLE and "run" not in row and "recall@10" not in row
            continue
        assert 0.0 <= row["recall@10"] <= 1.0 and "note" not in row
        if row["setting"] == "none":
            assert row["epsilon_spent"] == 0.0
        else:
            assert 0.0 < row["epsilon_spent"] <= row["epsilon_target"]
            assert 0.0 < row["delta"] < 1.0
    # ties and learned share a run; each run has its own folder
    by = {(r["setting"], r["method"]): r.get("run") for r in rows}
    assert by[("none", "ties")] == by[("none", "learned")] == "runs/none-epsinf-learned-seed0"
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(
        [
            "none-epsinf-average-seed0",
            "none-epsinf-learned-seed0",
            "update-dp-eps8-average-seed0",
            "update-dp-eps8-learned-seed0",
            "central-dp-eps8-average-seed0",
        ]
    )
    # two parties train once without privacy and once under update-dp; every other run reuses
    assert len(runs) == 5 and len(trainings) == 4
    assert [args[2].privacy.mechanism for args in trainings] == ["none"] * 2 + ["update-dp"] * 2
    central = out / "runs" / "central-dp-eps8-average-seed0"
    assert events(central).count("party_training_reused") == 2
    assert "party_training_reused" not in events(out / "runs" / "none-epsinf-average-seed0")
    # a line as each run starts and as it ends
    assert sum(" started" in line for line in said) == sum(" done in " in line for line in said)
    assert said[0].startswith("[1/5] none-epsinf-average-seed0: started")

    # given again: nothing runs, nothing trains, the same table
    before = {name: (out / name).read_bytes() for name in ("ablate.csv", "ablate.md")}
    said.clear()
    assert run_ablation(config, out, said.append) == rows
    assert len(runs) == 5 and len(trainings) == 4
    assert all(line.endswith(": complete, reused") for line in said)
    assert {name: (out / name).read_bytes() for name in before} == before

    # a run that is gone, and one that did not complete, are run again from the kept trainings:
    # the same metrics, byte for byte
    folders = [
        out / "runs" / "none-epsinf-average-seed0",
        out / "runs" / "none-epsinf-learned-seed0",
    ]
    metrics = [(f / "metrics.json").read_bytes() for f in folders]
    shutil.rmtree(folders[0])
    record = json.loads((folders[1] / "run.json").read_text())
    (folders[1] / "run.json").write_text(json.dumps(record | {"status": "interrupted"}))
    assert run_ablation(config, out, said.append) == rows
    assert len(runs) == 7 and len(trainings) == 4
    assert [(f / "metrics.json").read_bytes() for f in folders] == metrics
    assert {name: (out / name).read_bytes() for name in before} == before
    assert all(events(f).count("party_training_reused") == 2 for f in folders)
    kept = sorted(p.name for p in (out / "training-cache").iterdir())
    assert len(kept) == 8 and all(not name.startswith(".") for name in kept)


def tiny_federation(*extra: str) -> FederationConfig:
    return load_config(None, [f"domains={json.dumps(DOMAINS)}", *FAST, *extra], FederationConfig)


def test_training_key_ignores_what_cannot_change_training() -> None:
    start = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor([1])}
    mean = ["merge.method=average", "merge.learn.mode=none", "merge.rows=method"]
    plain = training_key(tiny_federation(), 0, start, Ledger())
    assert training_key(tiny_federation(*mean, "evaluate_valid=false"), 0, start, Ledger()) == plain
    central = tiny_federation(*mean, "privacy.mechanism=central-dp", "privacy.epsilon=1.0")
    assert training_key(central, 0, start, Ledger()) == plain
    update_dp = tiny_federation("privacy.mechanism=update-dp", "privacy.epsilon=1.0")
    other = {"w": start["w"] + 1e-6, "n": start["n"]}
    assert plain not in {
        training_key(tiny_federation(), 1, start, Ledger()),
        training_key(tiny_federation(), 0, other, Ledger()),
        training_key(tiny_federation(), 0, start, Ledger(rounds=1)),
        training_key(tiny_federation("train.lr=1e-3"), 0, start, Ledger()),
        training_key(update_dp, 0, start, Ledger()),
    }


def test_a_kept_training_is_whole_or_absent(tmp_path: Path, monkeypatch) -> None:
    reply = TrainReply("synth-0", {"w": torch.ones(3)}, {"users": 4.0, "epsilon": 1.5})
    ledger = Ledger(1, [(2.0, 1.0, 1)])
    save_training(tmp_path, "k", reply, ledger)
    loaded = load_training(tmp_path, "k")
    assert loaded is not None
    assert torch.equal(loaded[0].update["w"], reply.update["w"])
    assert (loaded[0].domain, loaded[0].metrics, loaded[1]) == ("synth-0", reply.metrics, ledger)

    def interrupted(self: Ledger) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(Ledger, "to_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_training(tmp_path, "cut", reply, ledger)
    assert load_training(tmp_path, "cut") is None  # its update alone is no kept training
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cut.safetensors",
        "k.json",
        "k.safetensors",
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            'settings=["nope"]',
            r"^settings lists 'nope', .*; use some of: central-dp, dpsgd, update-dp$",
        ),
        ('settings=["none"]', r"^settings lists 'none'; the non-private rows are always run"),
        ("settings=[]", r"^settings is empty; list at least one"),
        ('methods=["mean"]', r"^methods lists 'mean', .*; use some of: average, ties, learned"),
        ("methods=[]", r"^methods is empty"),
        ("epsilons=[0.0]", r"^epsilons lists 0; each target epsilon must be > 0"),
        ("epsilons=[-1.0]", r"^epsilons lists -1; each target epsilon must be > 0"),
        ("epsilons=[]", r"^epsilons is empty"),
        ("seeds=[]", r"^seeds is empty"),
        ("domains=[]", r"^domains is empty"),
        ('preset="no-such-preset"', r"^preset = 'no-such-preset' is neither a TOML file nor"),
        ('set=["seed=3"]', r"^set gives 'seed', which the grid sets on every row"),
        ('set=["merge.learn.mode=none"]', r"^methods lists 'learned' but preset .* learns no"),
        ('set=["train.lr=0"]', r"config key 'train.lr'"),
    ],
)
def test_bad_input_is_refused_before_any_run(
    tmp_path: Path, cache: Path, override: str, message: str
) -> None:
    out = tmp_path / "ablation"
    with pytest.raises(FedmergeError, match=message):
        run_ablation(load_config(ablation_file(tmp_path), [override], AblateConfig), out)
    assert not out.exists()


def test_the_shipped_ablation_plans_every_row(cache: Path) -> None:
    grid = plan(load_config("ablate-privacy", [], AblateConfig))
    # non-private, dpsgd and update-dp: average and learned (with ties); central-dp: average
    assert len(grid.runs) == 2 + 2 * 3 * 2 + 3
    assert len(grid.entries) == 3 + 3 * 3 * 3
    assert sum(e.note == IMPOSSIBLE for e in grid.entries) == 6
    assert grid.runs[0].config.domains == ["pantry", "toys"]
    assert default_out("configs/ablate-privacy.toml") == Path("runs/ablate-privacy")
    assert default_out("grid.toml") == Path("runs/ablate-grid")


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    env = os.environ | {"FEDMERGE_DATA": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = tmp_path / "ablation"
    args = ["ablate", "--config", str(ablation_file(tmp_path)), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "fedmerge", *args, "--set", "epsilons=[0.0]"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: epsilons lists 0; each target epsilon must be > 0")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
