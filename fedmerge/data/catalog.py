"""Resolve a domain name to DomainData: registered, synthetic, or imported by the user.

Registered domains are downloaded once and imported once: the parsed domain is cached under
``$FEDMERGE_DATA/domains/NAME-<sha256 prefix>/``. User imports live under
``$FEDMERGE_DATA/imported/NAME/``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedmerge.data.domain import DomainData
from fedmerge.data.download import cache_dir, fetch
from fedmerge.data.importers import read_archive
from fedmerge.data.registry import REGISTRY, get_spec
from fedmerge.data.synthetic import is_synthetic, synthetic_domain
from fedmerge.errors import FedmergeError

_VALID_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def _imported_dir(name: str) -> Path:
    return cache_dir() / "imported" / name


def imported_names() -> list[str]:
    """Names of the domains the user imported into this cache."""
    root = cache_dir() / "imported"
    return sorted(p.name for p in root.iterdir() if (p / "domain.json").exists()) if root.exists() else []


def check_domain_name(name: str) -> None:
    """Raise the unknown-domain error for a name that is neither registered, synthetic nor imported."""
    if not is_synthetic(name) and name not in imported_names():
        get_spec(name)


def load_domain(name: str, quiet: bool = False) -> DomainData:
    """Load domain `name`, downloading and importing it on first use.

    Parameters
    ----------
    name : str
        A registered name (``fedmerge data list``), ``synth-N``, or a name given to
        ``fedmerge data import``.
    quiet : bool
        Hide the download progress bar.
    """
    if is_synthetic(name):
        return synthetic_domain(name)
    if name not in REGISTRY and (_imported_dir(name) / "domain.json").exists():
        return DomainData.load(_imported_dir(name))
    spec = get_spec(name)
    processed = cache_dir() / "domains" / f"{name}-{spec.sha256[:12]}"
    if (processed / "domain.json").exists():
        return DomainData.load(processed)
    archive = fetch(spec, quiet=quiet)
    domain = read_archive(archive, spec.format, name)
    domain.save(processed)
    return domain


def import_domain(path: Path, fmt: str, name: str, allow_pickle: bool = False) -> DomainData:
    """Import the user's archive `path` (format `fmt`) and make it loadable as domain `name`."""
    if not _VALID_NAME.fullmatch(name):
        raise FedmergeError(f"domain name {name!r} is not allowed; use lower-case letters, digits, '-', '_' or '.'")
    if name in REGISTRY or is_synthetic(name):
        raise FedmergeError(f"{name!r} is a built-in domain name; choose another --name for your import")
    domain = read_archive(Path(path), fmt, name, allow_pickle=allow_pickle)
    domain.save(_imported_dir(name))
    return domain

