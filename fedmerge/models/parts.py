"""A domain with the item table its model family reads.

What training, evaluation and the parties work on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmerge.data.catalog import load_domain
from fedmerge.data.domain import DomainData
from fedmerge.models.family import FamilyConfig, family


@dataclass
class Part:
    """One domain's private data and its (public) item table."""

    domain: DomainData
    features: torch.Tensor


def load_parts(names: list[str], config: FamilyConfig, quiet: bool = False) -> list[Part]:
    """Each domain with the item table the family of `config` reads.

    See :meth:`Recommender.catalogue`.
    """
    return [
        Part(domain, family(config.kind).catalogue(domain, config, quiet))
        for domain in (load_domain(name, quiet=quiet) for name in names)
    ]
