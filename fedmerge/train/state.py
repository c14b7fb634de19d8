"""Resumable trainer state without pickles: tensors in safetensors, everything else in JSON.

A resume file may come from anyone who hands over a run folder, so nothing in it is
unpickled: ``trainer.safetensors`` holds every tensor (weights, optimiser moments, the torch
generator) and ``trainer.json`` the structure around them (numbers, strings, lists and
dictionaries, with a tensor written as ``{"__tensor__": key}``). Reading it builds plain
values and tensors only, whatever the files hold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path, write_json

TENSORS, STRUCTURE = "trainer.safetensors", "trainer.json"


def has_state(folder: Path) -> bool:
    """Whether `folder` holds a trainer state."""
    return (folder / STRUCTURE).is_file()


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write `state` (dicts, lists, tuples, numbers, strings, None and tensors) into `folder`.

    The tensors are written first and the JSON last, each atomically, so a state is complete
    once ``trainer.json`` exists. Dictionary keys keep their type (the optimiser's state is
    keyed by integers).
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    with atomic_path(folder / TENSORS) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / STRUCTURE, structure)


def load_state(folder: Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote into `folder`.

    A damaged or foreign state is a clear error.
    """
    try:
        structure = json.loads((folder / STRUCTURE).read_text())
        tensors = load_file(str(folder / TENSORS))
        return _decode(structure, tensors)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise FedmergeError(
            f"cannot resume from the trainer state in {folder} ({type(err).__name__}: {err}); "
            f"remove {folder} to start afresh"
        ) from err


def remove_state(folder: Path) -> None:
    """Delete the trainer state of `folder` (a finished run does not need it)."""
    for name in (STRUCTURE, TENSORS):
        (folder / name).unlink(missing_ok=True)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__items__": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": str(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in a trainer state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[str(value["__tensor__"])]
    if "__float__" in value:
        return float(str(value["__float__"]))
    return {_key(k): _decode(v, tensors) for k, v in value["__items__"]}


def _key(key: Any) -> Any:
    if isinstance(key, bool | int | str):
        return key
    raise TypeError(f"a dictionary key {key!r} is not an int or a string")
