"""Parameters are finite and in range.

Refused at load time, and no non-finite model or JSON is ever written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmerge import cli
from fedmerge.ablate import AblateConfig
from fedmerge.config import CONFIG_DIR, load_config, validate
from fedmerge.errors import FedmergeError
from fedmerge.files import write_json
from fedmerge.merge.methods import merge
from fedmerge.merge.server import MergeConfig
from fedmerge.protocol import FederationConfig
from fedmerge.train.checkpoint import save_weights
from fedmerge.train.config import ExperimentConfig


def merge_config(*overrides: str) -> MergeConfig:
    """The MergeConfig that ``fedmerge merge --method task_arithmetic --set ...`` builds."""
    return cli.merge_config("task_arithmetic", "task-wise", "mergerec", "usage", list(overrides))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nan", "must be a finite number (got nan)"),
        ("inf", "must be a finite number (got inf)"),
        ("-inf", "must be a finite number (got -inf)"),
        ("1e30", "must be less than or equal to 100 (got 1e+30)"),
    ],
)
def test_merge_coefficient_finite_and_bounded(value: str, problem: str) -> None:
    with pytest.raises(
        FedmergeError,
        match=rf"^config key 'method\.lam' {re.escape(problem)}; set it to a valid value$",
    ):
        merge_config(f"method.lam={value}")
    assert merge_config("method.lam=-100").params == {"lam": -100}


def test_floats_inside_lists_and_learn_settings() -> None:
    with pytest.raises(
        FedmergeError, match=r"^config key 'method\.weights\[1\]' must be a finite number"
    ):
        validate(MergeConfig, {"method": "average", "params": {"weights": [0.5, float("nan")]}})
    with pytest.raises(
        FedmergeError, match=r"^config key 'learn\.valid_scales\[0\]' must be a finite number"
    ):
        merge_config("learn.valid_scales=[inf]")
    with pytest.raises(
        FedmergeError, match=r"^config key 'learn\.lr' must be less than or equal to 10"
    ):
        merge_config("learn.lr=1e5")
    with pytest.raises(
        FedmergeError, match=r"^config key 'model\.text_weights\[1\]' must be a finite number"
    ):
        load_config("textseq", ["model.text_weights=[0.1, nan]"], ExperimentConfig)
    with pytest.raises(
        FedmergeError, match=r"^config key 'merge\.learn\.temperature' must be a finite number"
    ):
        load_config("simulate", ["merge.learn.temperature=nan"], FederationConfig)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("inf", "must be a finite number (got inf)"),
        ("nan", "must be a finite number (got nan)"),
        ("0", "must be greater than 0 (got 0)"),
        ("100", "must be less than or equal to 10 (got 100)"),
    ],
)
def test_learning_rate_refused_at_load(value: str, problem: str) -> None:
    with pytest.raises(
        FedmergeError,
        match=rf"^config key 'train\.lr' {re.escape(problem)}; set it to a valid value$",
    ):
        load_config("textseq", [f"train.lr={value}"], ExperimentConfig)


def test_dim_must_divide_into_heads() -> None:
    message = (
        r"^model\.dim = 30 is not a multiple of model\.heads = 4 .*; change model\.dim or "
        r"model\.heads$"
    )
    with pytest.raises(FedmergeError, match=message):
        load_config("textseq", ["model.dim=30", "model.heads=4"], ExperimentConfig)
    with pytest.raises(FedmergeError, match=message):
        load_config("simulate", ["model.dim=30", "model.heads=4"], FederationConfig)
    # a seeded BERT splits its hidden size across heads as well
    with pytest.raises(FedmergeError, match=message):
        load_config(
            "textenc", ["model.pretrained=false", "model.dim=30", "model.heads=4"], ExperimentConfig
        )
    # pretrained: unused
    assert (
        load_config("textenc", ["model.dim=30", "model.heads=4"], ExperimentConfig).model.dim == 30
    )
    with pytest.raises(
        FedmergeError, match=r"^model\.history_tokens = 600 does not fit the 512 positions"
    ):
        load_config("textenc", ["model.history_tokens=600"], ExperimentConfig)


def test_config_file_not_utf8_nor_regular(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[train]\nlr = 1e-3 # \xff\xfe\n")
    with pytest.raises(
        FedmergeError, match=rf"^config {bad} is not UTF-8 text .*; save it as UTF-8$"
    ):
        load_config(bad, None, ExperimentConfig)
    with pytest.raises(FedmergeError, match=rf"^config {tmp_path} is not a regular file"):
        load_config(tmp_path, None, ExperimentConfig)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    # returns, never blocks
    with pytest.raises(FedmergeError, match=rf"^config {fifo} is not a regular file"):
        load_config(fifo, None, ExperimentConfig)


def test_write_json_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "coefficients.json"
    with pytest.raises(
        FedmergeError, match=rf"^refusing to write {path}: .* NaN or infinite number"
    ):
        write_json(path, {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_save_weights_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    state = {
        "a": torch.zeros(3),
        "b": torch.tensor([1.0, float("nan")]),
        "c": torch.tensor([float("inf")]),
    }
    with pytest.raises(
        FedmergeError, match=rf"^refusing to write {path}: tensor 'b' holds NaN or infinite values"
    ):
        save_weights(state, path)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_merge_names_method_and_params() -> None:
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.full((2,), 3e38)}, {"w": torch.full((2,), 3e38)}]
    with pytest.raises(
        FedmergeError,
        match=r"^merge method 'task_arithmetic' with \{'lam': 100\.0\} gave NaN or "
        r"infinite values in 'w'",
    ):
        merge(base, models, "task_arithmetic", {"lam": 100.0})


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
def test_every_preset_loads(preset: str) -> None:
    schema = (
        AblateConfig
        if preset.startswith("ablate")
        else FederationConfig
        if preset.startswith(("simulate", "weaverec"))
        else ExperimentConfig
    )
    assert isinstance(load_config(preset, [], schema), schema)


def test_cli_train_refuses_infinite_lr_before_creating_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = os.environ | {"FEDMERGE_DATA": str(tmp_path / "cache"), "COLUMNS": "200"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmerge",
            "train",
            "--domain",
            "synth-0",
            "--out",
            str(out),
            "--set",
            "train.lr=inf",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "error: config key 'train.lr' must be a finite number (got inf); set it to a valid value"
    )
    assert not out.exists()


def test_a_config_stored_before_each_family_had_its_own_is_read_in_todays_layout() -> None:
    from fedmerge.models.family import upgrade_stored

    old = {
        "model": {
            "kind": "textseq",
            "dim": 64,
            "pretrained": True,
            "item_tokens": 32,
            "history_tokens": 256,
        },
        "train": {"lr": 5e-4, "negatives": 500, "text_weights": [0.0, 0.3]},
    }
    config = ExperimentConfig.model_validate(upgrade_stored(old))
    assert (config.model.dim, config.model.negatives, config.model.text_weights) == (
        64,
        500,
        [0.0, 0.3],
    )
    assert config.train.lr == 5e-4 and "negatives" in old["train"]  # the stored tree is not changed
    today = config.model_dump(mode="json")
    assert upgrade_stored(today) == today
