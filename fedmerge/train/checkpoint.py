"""Checkpoints: ``model.safetensors`` (weights) beside ``config.json`` (model config and facts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedmerge.config import ExperimentConfig, ModelConfig
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path
from fedmerge.models import MODELS, Recommender


def build_model(config: ModelConfig, text_dim: int, seed: int) -> Recommender:
    """The seeded base model theta_0 of `config`: the same for every domain with the same seed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MODELS[config.kind](config, text_dim)
    finally:
        torch.random.set_rng_state(generator_state)


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """Write the state dict of `model` (or a state dict itself) as safetensors, atomically."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`; a missing, extra or mis-shaped tensor is named in the error."""
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise FedmergeError(f"cannot read weights {path} ({err}); give a model.safetensors written by fedmerge") from err
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise FedmergeError(f"{path} lacks tensor {key!r}: it is a checkpoint of another model kind or config")
        if weights[key].shape != tensor.shape:
            raise FedmergeError(f"{path}: tensor {key!r} has shape {tuple(weights[key].shape)}, the model expects "
                                f"{tuple(tensor.shape)}; use the config the checkpoint was trained with")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise FedmergeError(f"{path} has tensor {extra[0]!r} that this model lacks: it is a checkpoint of another model")
    if any(not torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
        raise FedmergeError(f"{path} holds NaN or infinite weights; it cannot be used")
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
    """A trained model from a checkpoint folder (or its ``model.safetensors``), its config and facts."""
    weights, config_path = checkpoint_files(path)
    if not weights.exists() or not config_path.exists():
        raise FedmergeError(f"{path} is not a fedmerge checkpoint (needs config.json beside model.safetensors or "
                            "merged.safetensors); give the --out folder of `fedmerge train` or `fedmerge merge`")
    meta = json.loads(config_path.read_text())
    config = ExperimentConfig.model_validate(meta["config"])
    model = build_model(config.model, meta["text_dim"], config.train.seed)
    load_weights(model, weights)
    return model, config, meta
