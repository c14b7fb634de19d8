"""Resolve a domain name to DomainData: registered, synthetic, or imported by the user.

Registered domains are downloaded once and imported once: the parsed domain is cached under
``$FEDMERGE_DATA/domains/NAME-<sha256 prefix>/``; a corrupt cached copy is reported on stderr
and rebuilt from the archive. User imports live under ``$FEDMERGE_DATA/imported/NAME/``; they
cannot be rebuilt, so a corrupt one is an error that says to import it again, and importing
under a taken name needs ``replace`` (the old import survives until the new one is complete).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console

from fedmerge.data.domain import CorruptCacheError, DomainData
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
    if not root.exists():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if _VALID_NAME.fullmatch(p.name) and (p / "domain.json").exists()
    )


def _has_cache(folder: Path) -> bool:
    """Whether `folder` holds (part of) a saved domain."""
    return (folder / "domain.json").exists() or (folder / "arrays.npz").exists()


def check_domain_name(name: str) -> None:
    """Raise the unknown-domain error for a name neither registered, synthetic nor imported."""
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
    if name not in REGISTRY and _has_cache(_imported_dir(name)):
        try:
            return DomainData.load(_imported_dir(name))
        except CorruptCacheError as err:
            raise FedmergeError(
                f"the imported domain {name!r} is unreadable: {err.path} is corrupt; import it "
                f"again with `fedmerge data import PATH --format FORMAT --name {name} --replace`"
            ) from err
    spec = get_spec(name)
    processed = cache_dir() / "domains" / f"{name}-{spec.sha256[:12]}"
    if _has_cache(processed):
        try:
            return DomainData.load(processed)
        except CorruptCacheError as err:
            Console(stderr=True, markup=False, highlight=False, soft_wrap=True).print(
                f"warning: the cached domain file {err.path} is corrupt; rebuilding {name} from "
                "its archive"
            )
    archive = fetch(spec, quiet=quiet)
    domain = read_archive(archive, spec.format, name)
    domain.save(processed)
    return domain


def _imported_from(name: str) -> str:
    """Where the existing import `name` came from, as recorded in its domain.json (best effort)."""
    try:
        return str(json.loads((_imported_dir(name) / "domain.json").read_text())["source"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return "an earlier import"


def import_domain(
    path: Path, fmt: str, name: str, allow_pickle: bool = False, replace: bool = False
) -> DomainData:
    """Import the user's archive `path` (format `fmt`) and make it loadable as domain `name`.

    Parameters
    ----------
    path : Path
        The archive (a RecBole dataset may be a folder).
    fmt : str
        Importer name (``mergerec``, ``seqrec-zip``, ``recbole``).
    name : str
        The domain name to import under.
    allow_pickle : bool
        Unpickle an unpinned ``seqrec-zip`` (runs its code).
    replace : bool
        Replace an existing import of `name`; without it a taken name is an error. The old
        import is kept until the new one is completely written.
    """
    if not _VALID_NAME.fullmatch(name):
        raise FedmergeError(
            f"domain name {name!r} is not allowed; use lower-case letters, digits, '-', '_' or '.'"
        )
    if name in REGISTRY or is_synthetic(name):
        raise FedmergeError(
            f"{name!r} is a built-in domain name; choose another --name for your import"
        )
    if not replace and _has_cache(_imported_dir(name)):
        raise FedmergeError(
            f"{name} is already imported (from {_imported_from(name)}); pass --replace to replace "
            "it"
        )
    domain = read_archive(Path(path), fmt, name, allow_pickle=allow_pickle)
    domain.save(_imported_dir(name))
    return domain
