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
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmerge.errors import FedmergeError

M = TypeVar("M", bound=BaseModel)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BERT_POSITIONS = 512  # position embeddings of the pretrained all-MiniLM-L6-v2 (textenc)
LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]
"""Every learning rate: positive, at most 10."""


class ConfigModel(BaseModel):
    """The base of every config model: unknown keys, NaN and infinity are refused (also inside lists)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(ConfigModel):
    """The recommender (its parameter layout depends only on this, never on the domain)."""

    kind: Literal["textseq", "textenc"] = Field(
        "textseq", description="model family: textseq (text-feature transformer) or textenc (fine-tuned MiniLM)")
    encoder: Literal["minilm", "hashing"] = Field("minilm", description="textseq: the frozen encoder of the item features")
    dim: int = Field(128, ge=8, description="item / user vector size (textenc: only when not pretrained)")
    layers: int = Field(2, ge=0, description="transformer layers (textenc: only when not pretrained)")
    heads: int = Field(2, ge=1, description="attention heads; dim must be a multiple of it")
    max_len: int = Field(50, ge=1, description="most recent items a user vector sees")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout rate in the transformer and adaptor")
    experts: int = Field(4, ge=1, description="experts of the text adaptor (mixture of whitening projections)")
    temperature: float = Field(0.05, gt=0.0, le=10.0, description="softmax temperature on cosine scores")
    pretrained: bool = Field(True, description="textenc: start from all-MiniLM-L6-v2 (else a seeded dim/layers/heads BERT)")
    item_tokens: int = Field(32, ge=1, description="textenc: tokens kept of each item's text")
    history_tokens: int = Field(256, ge=8, description="textenc: tokens kept of a user's history text")
    code_tables: int = Field(8, ge=0, description="textseq: hashed text-code embedding tables added to item vectors")
    code_bits: int = Field(12, ge=1, le=20, description="textseq: bits of each text code (2**bits rows per table)")

    @model_validator(mode="after")
    def _buildable(self) -> ModelConfig:
        """Refuse sizes the model cannot be built with: attention splits dim across heads; BERT's positions."""
        if (self.kind == "textseq" or not self.pretrained) and self.dim % self.heads:
            raise ValueError(f"model.dim = {self.dim} is not a multiple of model.heads = {self.heads} (each attention "
                             "head gets dim / heads dimensions); change model.dim or model.heads")
        if self.kind == "textenc" and self.pretrained:
            for key, tokens in (("history_tokens", self.history_tokens), ("item_tokens", self.item_tokens + 2)):
                if tokens > BERT_POSITIONS:
                    raise ValueError(f"model.{key} = {getattr(self, key)} does not fit the {BERT_POSITIONS} positions "
                                     "of the pretrained encoder (an item's text also takes [CLS] and [SEP]); lower it")
        return self


class TrainConfig(ConfigModel):
    """Local training."""

    epochs: int = Field(30, ge=0, description="most training epochs (early stopping may end sooner)")
    batch_size: int = Field(256, ge=1, description="training sequences per batch")
    lr: LearningRate = Field(1e-3, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    patience: int = Field(3, ge=1, description="epochs without a better valid ndcg@10 before stopping")
    seed: int = Field(0, description="seed of theta_0, the batch order and the validation sample")
    eval_batch_size: int = Field(1024, ge=1, description="users scored per batch in evaluation")
    targets: Literal["all", "last"] = Field(
        "all", description="train on every position of each sequence (every prefix), or on its last item only")
    negatives: int | None = Field(
        None, ge=1, description="textseq: sampled softmax over this many uniform negatives per batch when the "
        "catalogue is larger (None: full softmax over all items)")
    valid_users: int | None = Field(
        None, ge=1, description="early stopping and the text weight read valid ndcg@10 of this many users drawn "
        "once (seeded) per domain (None: every user); the reported metrics always use every user")
    text_weights: list[Annotated[float, Field(ge=0.0, le=100.0)]] = Field(
        [0.0, 0.1, 0.2, 0.3, 0.5], description="textseq: raw text-similarity weights tried on validation after training")
    device: str = Field("cpu", description="torch device to train and evaluate on: cpu, cuda, cuda:1, mps")
    max_minutes: float | None = Field(
        None, gt=0.0, description="stop once the training epochs (not evaluation) took this long, across resumes")
    ema: float | None = Field(
        None, gt=0.0, lt=1.0, description="validate and keep an exponential moving average of the weights with "
        "this decay per step instead of the raw weights (None: the raw weights)")
    frozen: list[str] = Field(
        [], description="parameters kept at their starting values: names or name prefixes, e.g. blocks, codes, "
        "positions (a base pretrained with only the adaptor trained keeps the text-similarity start)")


class ExperimentConfig(ConfigModel):
    """Everything one training run needs besides the data."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


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


def load_config(path: Path | str | None = None, overrides: list[str] | None = None,
                schema: type[M] = ExperimentConfig) -> M:  # type: ignore[assignment]
    """Load a preset (a TOML file, or a name in ``configs/``) and apply ``key=value`` overrides.

    Parameters
    ----------
    path : Path | str | None
        A TOML file, the name of a preset in ``configs/`` (``textseq``), or None for defaults.
    overrides : list[str] | None
        ``section.key=value`` strings, e.g. ``train.lr=5e-4``.
    schema : type
        The pydantic model the result is validated as (an experiment, or a federation run).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.exists() and (CONFIG_DIR / f"{path}.toml").exists():
            file = CONFIG_DIR / f"{path}.toml"
        presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        try:
            if not stat.S_ISREG(os.stat(file).st_mode):  # a folder or a FIFO: never read (a FIFO would block)
                raise FedmergeError(f"config {file} is not a regular file; give a TOML file or a preset: {presets}")
            tree = tomllib.loads(file.read_bytes().decode("utf-8"))
        except OSError as err:
            raise FedmergeError(f"cannot read config {path} ({err.strerror}); give a TOML file or a preset: {presets}") from err
        except UnicodeDecodeError as err:
            raise FedmergeError(f"config {file} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from err
        except tomllib.TOMLDecodeError as err:
            raise FedmergeError(f"config {file} is not valid TOML ({err})") from err
    return validate(schema, apply_overrides(tree, overrides or []))


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``section.key=value`` of `overrides` in the nested dict `tree` (in place; returned)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedmergeError(f"--set {item!r} is not key=value (e.g. --set train.lr=5e-4)")
        _set(tree, key.strip(), _parse_value(value.strip()))
    return tree


def validate(model: type[M], tree: dict[str, Any], prefix: str = "") -> M:
    """`tree` validated as `model`, or a FedmergeError that names the first bad key (``prefix.key``).

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
        key = prefix + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])[1:]
        if first["type"] == "extra_forbidden":
            raise FedmergeError(f"config key {key!r} is not a known key") from err
        if first["type"] == "value_error":
            raise FedmergeError(str(first["ctx"]["error"])) from err
        problem = first["msg"][0].lower() + first["msg"][1:]
        problem = problem.replace("input should be", "must be", 1)
        raise FedmergeError(f"config key {key!r} {problem} (got {first['input']!r}); set it to a valid value") from err
