"""Checkpoints: ``model.safetensors`` (weights) beside ``config.json`` (model config and facts)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedmerge.config import validate
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path
from fedmerge.models import Recommender, build_model
from fedmerge.models.family import nonfinite, upgrade_stored
from fedmerge.train.config import ExperimentConfig


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """Write the state dict of `model` (or a state dict itself) as safetensors, atomically.

    Raises
    ------
    FedmergeError
        When a floating tensor holds NaN or infinity (named with the file); nothing is written then.
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    if (bad := nonfinite(state)) is not None:
        raise FedmergeError(
            f"refusing to write {path}: tensor {bad!r} holds NaN or infinite values; the training "
            "or merge that computed it diverged, so lower its learning rate or coefficients"
        )
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`.

    Anything else (a FIFO, a folder, a truncated or foreign file, NaN or infinite weights) is
    refused with an error that names the file.
    """
    path = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as err:
        raise FedmergeError(
            f"cannot read weights {path} ({err.strerror}); give a .safetensors file or a "
            "fedmerge checkpoint folder"
        ) from err
    if not regular:
        raise FedmergeError(
            f"{path} is not a regular file; give a .safetensors file or a fedmerge checkpoint "
            "folder"
        )
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise FedmergeError(
            f"cannot read weights {path} ({err}); it is truncated or not safetensors: give a "
            "model.safetensors written by fedmerge"
        ) from err
    if (bad := nonfinite(weights)) is not None:
        raise FedmergeError(
            f"{path} holds NaN or infinite weights (tensor {bad!r}); it cannot be used"
        )
    return weights


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`.

    A missing, extra or mis-shaped tensor is named in the error.
    """
    weights = read_state(path)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise FedmergeError(
                f"{path} lacks tensor {key!r}: it is a checkpoint of another model kind or config"
            )
        if weights[key].shape != tensor.shape:
            raise FedmergeError(
                f"{path}: tensor {key!r} has shape {tuple(weights[key].shape)}, the model expects "
                f"{tuple(tensor.shape)}; use the config the checkpoint was trained with"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise FedmergeError(
            f"{path} has tensor {extra[0]!r} that this model lacks: it is a checkpoint of another "
            "model"
        )
    model.load_state_dict(weights)


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(weights, config.json) for a checkpoint folder or its weights file.

    A folder's weights are its ``model.safetensors`` (``fedmerge train``), else its
    ``merged.safetensors`` (``fedmerge merge``).
    """
    path = Path(path)
    weights = path
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.exists() and (path / "merged.safetensors").exists():
            weights = path / "merged.safetensors"
    return weights, weights.parent / "config.json"


def load_checkpoint(path: Path) -> tuple[Recommender, ExperimentConfig, dict[str, Any]]:
    """A trained model from a checkpoint folder, its config and facts.

    `path` is the folder or its ``model.safetensors``.
    """
    weights, config_path = checkpoint_files(path)
    if not weights.exists() or not config_path.exists():
        raise FedmergeError(
            f"{path} is not a fedmerge checkpoint (needs config.json beside model.safetensors or "
            "merged.safetensors); give the --out folder of `fedmerge train` or `fedmerge merge`"
        )
    meta = read_meta(config_path)
    model = build_model(meta["config"].model, meta["text_dim"], meta["config"].train.seed)
    load_weights(model, weights)
    return model, meta["config"], meta


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json``, its ``config`` validated.

    A damaged file is named in the error.
    """
    fix = "it is damaged or not written by fedmerge: train the checkpoint again or restore the file"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise FedmergeError(f"{path} is not a regular file; {fix}")
        meta = json.loads(path.read_text())
        meta["config"] = validate(
            ExperimentConfig, upgrade_stored(meta["config"]), prefix="config."
        )
        meta["text_dim"] = int(meta["text_dim"])
        if meta["text_dim"] < 1:
            raise ValueError("text_dim must be positive")
    except FedmergeError as err:
        raise FedmergeError(f"{path}: {err}; {fix}") from err
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise FedmergeError(f"cannot read {path} ({type(err).__name__}: {err}); {fix}") from err
    return meta
