"""The model-family contract: what every recommender family gives the generic layers.

A *family* (``textseq``, ``textenc``, ...) is a :class:`Recommender` subclass registered by
name (:func:`register`) with its own config class (a :class:`FamilyConfig` whose ``kind`` is
the family's name). Generic code (training, evaluation, merging, the federation) only calls
the methods below, never a family by name:

- :meth:`Recommender.catalogue`: the public item table the family reads (features, tokens);
- :meth:`Recommender.tunable`: which parameters training may update;
- :meth:`Recommender.exchanged`: the state that travels between a party and the server;
- :meth:`Recommender.loss`: the training loss on a batch of sequences;
- :meth:`Recommender.scorer`: scores of every item for a batch of histories (evaluation, teachers);
- :meth:`Recommender.candidate_scorer`: scores of each history's candidate list only;
- :meth:`Recommender.merge_space` / :meth:`Recommender.merge_update` /
  :meth:`Recommender.load_merged`: the weights task vectors are taken and merged in (the
  exchanged state itself, or the weights it stands for, e.g. the base plus a LoRA adapter's
  Delta W), an update in that space, and setting the model from a merge;
- :meth:`Recommender.parameter_group`: the layer group of a tensor (layer-wise coefficients);
- :meth:`Recommender.merge_anchor` / :meth:`Recommender.student_scores`: what learned merging needs;
- :meth:`Recommender.calibration` / :meth:`Recommender.calibrate` / :meth:`Recommender.facts`:
  a setting chosen on validation after training (textseq's text weight);
- :meth:`Recommender.row_usage`: item-memory rows and how many items read each.

The config of a run's model is validated by its ``kind``: :data:`ModelConfig` dispatches to the
registered family's config class, so each family has its own keys and checks.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import Field, SerializeAsAny, ValidatorFunctionWrapHandler, WrapValidator
from torch import nn

from fedmerge.config import ConfigModel
from fedmerge.data.domain import DomainData
from fedmerge.errors import FedmergeError

StateDict = dict[str, torch.Tensor]
HistoryScorer = Callable[[torch.Tensor], torch.Tensor]
"""``score(histories) -> (B, n_items)``: every item's scores for right-padded histories (B, L).

Histories are padded with -1.
"""
CandidateScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score(histories, candidates) -> (B, C)``: scores of each history's candidate items (B, C)."""
ItemVectors = Literal["fixed", "history", "current"]
"""Which item representations follow the merge coefficients while they are learned.

The setting is ``learn.item_vectors``.
"""


class FamilyConfig(ConfigModel):
    """The config every family's own config extends: its ``kind`` and the history length."""

    kind: str = Field(description="model family (a registered name: see `fedmerge train --help`)")
    max_len: int = Field(50, ge=1, description="most recent items a user's history holds")


C = TypeVar("C", bound=FamilyConfig)
"""A family's own config class (the ``Config`` of a :class:`Recommender` subclass)."""


class Recommender(nn.Module, Generic[C]):
    """A recommender family (see the module docstring). Subclasses set ``kind`` and ``Config``.

    ``table`` everywhere is the domain's item table built by :meth:`catalogue`. The type
    parameter is the family's config class: ``class Mine(Recommender[MineConfig])``.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[FamilyConfig]]
    linear_updates: ClassVar[bool] = True
    """Whether updates add up in the merge space (the sum of two updates moves the merged weights
    by the sum of their moves). Secure aggregation and central noise sum updates before the
    server sees them, so they need it; a LoRA adapter's factors do not add up."""
    pretrain_frozen: ClassVar[list[str]] = []
    """Parameters ``fedmerge pretrain`` keeps at theta_0 unless the config names others."""

    def __init__(self, config: C, width: int) -> None:
        super().__init__()
        self.config = config
        self.width = width

    @classmethod
    def catalogue(cls, domain: DomainData, config: C, quiet: bool = True) -> torch.Tensor:
        """The public (n_items, width) item table of `domain` that this family reads."""
        raise NotImplementedError

    def tunable(self, name: str) -> bool:
        """Whether training may update parameter `name`.

        Default: every parameter (``train.frozen`` freezes more); a family with a frozen backbone
        (a LoRA adapter on a language model) names its trained part.
        """
        return True

    def exchanged(self) -> StateDict:
        """The state a party and the server exchange.

        All weights by default; a family may send a part.
        """
        return dict(self.state_dict())

    def load_exchanged(self, state: StateDict) -> None:
        """Set the exchanged state (the rest of the model keeps its values)."""
        self.load_state_dict(state, strict=set(state) == set(self.state_dict()))

    def loss(
        self, table: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The training loss of right-padded (B, L) `inputs` (pad -1) and next items `targets`."""
        raise NotImplementedError

    def record_losses(
        self, table: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The (B,) loss of each sequence alone: what private training clips one by one.

        Record i's loss may depend on record i and on data-free randomness only (no in-batch
        negatives). A family whose loss couples the records of a batch leaves this out, and
        record-level private training refuses it.
        """
        raise NotImplementedError

    def scorer(self, table: torch.Tensor) -> HistoryScorer:
        """Scores of all items for histories, with the current weights.

        Whatever is shared is computed once.
        """
        raise NotImplementedError

    def candidate_scorer(self, table: torch.Tensor) -> CandidateScorer:
        """Scores of each history's candidate items only, with the current weights.

        Default: :meth:`scorer`'s scores of every item, read at the candidates. A family that
        cannot score every item (a language model) scores the candidates alone.
        """
        score = self.scorer(table)
        return lambda histories, candidates: score(histories).gather(1, candidates)

    def merge_space(self, state: StateDict) -> StateDict:
        """The weights task vectors are taken and merged in, for an exchanged `state`.

        Default: the exchanged state itself. A family whose exchanged state is not additive (a
        LoRA adapter's factors) maps it to weights that are (the base weights plus Delta W).
        """
        return state

    def load_merged(self, state: StateDict) -> None:
        """Set the model from `state` in the merge space (:meth:`merge_space`)."""
        self.load_exchanged(state)

    def merge_update(self, update: StateDict) -> StateDict:
        """An update of the exchanged state, from the model's current one, as a merge-space vector.

        Default: the update itself. What a LoRA update moves Delta W by, for a LoRA family.
        """
        return update

    def parameter_group(self, name: str) -> str:
        """The layer group of exchanged tensor `name` for layer-wise merge coefficients.

        Default: one group.
        """
        return "others"

    def merge_anchor(self, table: torch.Tensor) -> Any:
        """What the learned merge computes once with the initial merge's weights.

        These are the fixed candidate representations.
        """
        return None

    def student_scores(
        self, table: torch.Tensor, anchor: Any, histories: torch.Tensor, follow: ItemVectors
    ) -> torch.Tensor:
        """Differentiable scores of all items for pseudo-users' `histories`.

        Used while merge coefficients are learned.

        `anchor` is :meth:`merge_anchor` of the initial merge; `follow` says which item
        representations are recomputed with the current weights. Default: the plain scores.
        """
        return self.scorer(table)(histories)

    def student_candidate_scores(
        self,
        table: torch.Tensor,
        anchor: Any,
        histories: torch.Tensor,
        candidates: torch.Tensor,
        follow: ItemVectors,
    ) -> torch.Tensor:
        """Differentiable scores of each pseudo-user's candidate items (``learn.candidates``).

        Default: :meth:`student_scores` read at the candidates.
        """
        return self.student_scores(table, anchor, histories, follow).gather(1, candidates)

    def row_usage(self, table: torch.Tensor) -> dict[str, torch.Tensor]:
        """Item-memory tables (tensor name -> how many items of `table` read each row).

        None by default.
        """
        return {}

    def calibration(self) -> list[float]:
        """The values of a post-training setting tried on validation.

        Empty when the family has none.
        """
        return []

    def calibration_scores(
        self, table: torch.Tensor
    ) -> Callable[[torch.Tensor], Iterator[torch.Tensor]]:
        """For histories, the scores with each value of :meth:`calibration` in turn.

        Shared work is done once.
        """
        raise NotImplementedError

    def calibrate(self, value: float) -> None:
        """Set the post-training setting to `value` (one of :meth:`calibration`)."""

    def facts(self) -> dict[str, float]:
        """Settings reported with every evaluation of the model (the calibrated value)."""
        return {}


R = TypeVar("R", bound=Recommender[Any])
FAMILIES: dict[str, type[Recommender[Any]]] = {}
DEFAULT_KIND = "textseq"
PLUGINS = "FEDMERGE_PLUGINS"
"""Environment variable: modules (comma-separated) imported when a model kind is not registered yet;
each registers its families. Every process that meets the kind imports them (Ray workers inherit the
variable; a deployed SuperNode's operator sets it), so a family of one's own runs on every backend.
"""


def check_heads(dim: int, heads: int) -> None:
    """Refuse a width that attention cannot split evenly across its heads.

    Parameters
    ----------
    dim : int
        The model width (``model.dim``).
    heads : int
        The number of attention heads (``model.heads``).

    Raises
    ------
    ValueError
        When ``dim`` is not a multiple of ``heads``, naming both keys and the fix.
    """
    if dim % heads:
        raise ValueError(
            f"model.dim = {dim} is not a multiple of model.heads = {heads} (each attention "
            "head gets dim / heads dimensions); change model.dim or model.heads"
        )


def register(cls: type[R]) -> type[R]:
    """Register a family under its ``kind`` (a class decorator); a name is taken once."""
    if cls.kind in FAMILIES and FAMILIES[cls.kind] is not cls:
        raise ValueError(f"model family {cls.kind!r} is already registered")
    FAMILIES[cls.kind] = cls
    return cls


def _known(kind: str) -> bool:
    """Whether `kind` is registered, once the :data:`PLUGINS` modules are imported if it is not."""
    if kind not in FAMILIES:
        for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS, "").split(","))):
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise FedmergeError(
                    f"{PLUGINS} names module {name!r}, which cannot be imported ({err}); "
                    "fix the name or install the module"
                ) from err
    return kind in FAMILIES


def _unknown(kind: str) -> str:
    return (
        f"model kind {kind!r} is not a registered model family; use one of: {', '.join(FAMILIES)} "
        "(a family of your own registers with fedmerge.models.register in a module named in "
        f"{PLUGINS})"
    )


def family(kind: str) -> type[Recommender[Any]]:
    """The registered family `kind`, or an error that lists the registered ones."""
    if not _known(kind):
        raise FedmergeError(_unknown(kind))
    return FAMILIES[kind]


def _by_kind(value: Any, handler: ValidatorFunctionWrapHandler) -> FamilyConfig:
    """Validate a model config as its family's config class.

    The family is chosen by ``kind``; default :data:`DEFAULT_KIND`.
    """
    if isinstance(value, FamilyConfig):
        return value
    if isinstance(value, dict):
        kind = value.get("kind", DEFAULT_KIND)
        if not isinstance(kind, str) or not _known(kind):
            raise ValueError(_unknown(str(kind)))
        return FAMILIES[kind].Config.model_validate(value)
    return handler(value)


ModelConfig = Annotated[SerializeAsAny[FamilyConfig], WrapValidator(_by_kind)]
"""A model config: one config class per family, chosen by ``kind`` (a union over the registry)."""


MOVED_FROM_TRAIN = ("negatives", "text_weights")
"""Keys an earlier fedmerge's stored config keeps under ``train``; they now belong to the model."""


def upgrade_stored(config: dict[str, Any]) -> dict[str, Any]:
    """A config tree stored before each family had its own config, in today's layout.

    The tree has ``model`` and ``train`` tables: :data:`MOVED_FROM_TRAIN` moves to ``model``, other
    families' keys are dropped. A tree in today's layout comes back equal; `config` is not changed.
    """
    tree = {
        **config,
        "model": dict(config.get("model") or {}),
        "train": dict(config.get("train") or {}),
    }
    for key in MOVED_FROM_TRAIN:
        if key in tree["train"]:
            tree["model"].setdefault(key, tree["train"].pop(key))
    kind = tree["model"].get("kind", DEFAULT_KIND)
    if isinstance(kind, str) and _known(kind):
        fields = FAMILIES[kind].Config.model_fields
        tree["model"] = {k: v for k, v in tree["model"].items() if k in fields}
    return tree


def default_model() -> FamilyConfig:
    """The default model config (the :data:`DEFAULT_KIND` family's defaults)."""
    return FAMILIES[DEFAULT_KIND].Config.model_validate({})


def build_model(config: FamilyConfig, width: int, seed: int) -> Recommender[Any]:
    """The seeded base model theta_0 of `config`: the same for every domain with the same seed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return family(config.kind)(config, width)
    finally:
        torch.random.set_rng_state(generator_state)


def nonfinite(state: StateDict) -> str | None:
    """The name of the first floating tensor of `state` that holds NaN or an infinity.

    None when all are finite.
    """
    return next(
        (key for key, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()),
        None,
    )
