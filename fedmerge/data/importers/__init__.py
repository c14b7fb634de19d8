"""Importers from archive formats into DomainData, by format name."""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable
from pathlib import Path

from fedmerge.data.domain import DomainData
from fedmerge.data.importers.mergerec import read_mergerec
from fedmerge.data.importers.recbole import read_recbole
from fedmerge.data.importers.safe_io import check_path
from fedmerge.data.importers.seqrec import read_seqrec_zip
from fedmerge.errors import FedmergeError

Importer = Callable[..., DomainData]
IMPORTERS: dict[str, Importer] = {
    "mergerec": read_mergerec,
    "seqrec-zip": read_seqrec_zip,
    "recbole": read_recbole,
}


def read_archive(path: Path, fmt: str, name: str, allow_pickle: bool = False) -> DomainData:
    """Import `path` in format `fmt` as domain `name`.

    ``allow_pickle`` only matters for ``seqrec-zip`` archives whose sha256 is not pinned. The
    path must be a regular file (or, for ``recbole``, a folder): a FIFO, device or socket is
    refused before anything opens it, so a bad path cannot hang the import.
    """
    if fmt not in IMPORTERS:
        raise FedmergeError(f"unknown format {fmt!r}; use one of: {', '.join(IMPORTERS)}")
    what = "a RecBole folder or .inter file" if fmt == "recbole" else f"a {fmt} archive"
    check_path(Path(path), what, folder_ok=fmt == "recbole")
    try:
        if fmt == "seqrec-zip":
            return read_seqrec_zip(Path(path), name, allow_pickle=allow_pickle)
        return IMPORTERS[fmt](Path(path), name)
    except FedmergeError:
        raise
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        RecursionError,
        zlib.error,
        csv.Error,
    ) as err:
        raise FedmergeError(
            f"{path} could not be imported as {fmt} ({type(err).__name__}: {err}); "
            "check --format and that the file is complete"
        ) from err
