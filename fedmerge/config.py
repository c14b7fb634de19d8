"""Experiment configuration: pydantic models loaded from TOML presets plus ``--set key=value``.

Keys are dotted (``model.dim``, ``train.lr``); an unknown, ill-typed, non-finite or
out-of-range key is an error that names the key. Every config model of the project derives
from :class:`ConfigModel`, so none accepts NaN or infinity in a float field.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmerge.errors import FedmergeError

M = TypeVar("M", bound=BaseModel)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]
"""Every learning rate: positive, at most 10."""


class ConfigModel(BaseModel):
    """The base of every config model: unknown keys, NaN and infinity are refused.

    NaN and infinity are refused inside lists too.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML/JSON literal when it parses as one, else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FedmergeError(f"--set {key}: {part!r} is not a section")
    node[leaf] = value


def load_config(path: Path | str | None, overrides: list[str] | None, schema: type[M]) -> M:
    """Load a preset (a TOML file, or a name in ``configs/``) and apply ``key=value`` overrides.

    Parameters
    ----------
    path : Path | str | None
        A TOML file, the name of a preset in ``configs/`` (``textseq``), or None for defaults.
    overrides : list[str] | None
        ``section.key=value`` strings, e.g. ``train.lr=5e-4``.
    schema : type
        The pydantic model the result is validated as (``ExperimentConfig`` of a training run,
        ``FederationConfig`` of a federated one).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.exists() and (CONFIG_DIR / f"{path}.toml").exists():
            file = CONFIG_DIR / f"{path}.toml"
        presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        try:
            # a folder or a FIFO: never read (a FIFO would block)
            if not stat.S_ISREG(os.stat(file).st_mode):
                raise FedmergeError(
                    f"config {file} is not a regular file; give a TOML file or a preset: {presets}"
                )
            tree = tomllib.loads(file.read_bytes().decode("utf-8"))
        except OSError as err:
            raise FedmergeError(
                f"cannot read config {path} ({err.strerror}); give a TOML file or a preset: "
                f"{presets}"
            ) from err
        except UnicodeDecodeError as err:
            raise FedmergeError(
                f"config {file} is not UTF-8 text (bad byte at offset {err.start}); save it as "
                "UTF-8"
            ) from err
        except tomllib.TOMLDecodeError as err:
            raise FedmergeError(f"config {file} is not valid TOML ({err})") from err
    return validate(schema, apply_overrides(tree, overrides or []))


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``section.key=value`` of `overrides` in the nested dict `tree`, in place.

    `tree` is also returned.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedmergeError(f"--set {item!r} is not key=value (e.g. --set train.lr=5e-4)")
        _set(tree, key.strip(), _parse_value(value.strip()))
    return tree


def validate(model: type[M], tree: dict[str, Any], prefix: str = "") -> M:
    """`tree` validated as `model`, or a FedmergeError naming the first bad key as ``prefix.key``.

    Parameters
    ----------
    model : type
        The pydantic model (a :class:`ConfigModel`).
    tree : dict
        The nested settings.
    prefix : str
        Put before every key named in an error (``method.``).

    Raises
    ------
    FedmergeError
        One sentence: the key, what is wrong with its value, and the fix. A model validator's
        own message (it names its keys) is passed on as it is.
    """
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        key = (
            prefix
            + "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
            )[1:]
        )
        if first["type"] == "extra_forbidden":
            raise FedmergeError(f"config key {key!r} is not a known key") from err
        if first["type"] == "value_error":
            raise FedmergeError(str(first["ctx"]["error"])) from err
        problem = first["msg"][0].lower() + first["msg"][1:]
        problem = problem.replace("input should be", "must be", 1)
        raise FedmergeError(
            f"config key {key!r} {problem} (got {first['input']!r}); set it to a valid value"
        ) from err
