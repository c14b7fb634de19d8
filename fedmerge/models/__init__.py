"""Model families behind one contract (:mod:`fedmerge.models.family`), registered by name.

Every model of one family and config shares its parameter layout across domains, so task
vectors align. ``textseq`` and ``textenc`` register themselves here; another family registers
with :func:`register` (see docs/extending.md).
"""

from fedmerge.models import llm, textenc, textseq
from fedmerge.models.family import (
    FAMILIES,
    FamilyConfig,
    ModelConfig,
    Recommender,
    StateDict,
    build_model,
    default_model,
    family,
    register,
)
from fedmerge.models.parts import Part, load_parts

__all__ = [
    "FAMILIES",
    "FamilyConfig",
    "ModelConfig",
    "Part",
    "Recommender",
    "StateDict",
    "build_model",
    "default_model",
    "family",
    "llm",
    "load_parts",
    "register",
    "textenc",
    "textseq",
]
