"""Datasets: registry, download cache, importers, DomainData, synthetic domains."""

from fedmerge.data.catalog import import_domain, load_domain
from fedmerge.data.domain import DomainData
from fedmerge.data.registry import REGISTRY, DatasetSpec

__all__ = ["REGISTRY", "DatasetSpec", "DomainData", "import_domain", "load_domain"]
