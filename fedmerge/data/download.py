"""Download archives once into the cache, atomically and verified, optionally from a mirror.

The cache is ``$FEDMERGE_DATA`` (default ``~/.cache/fedmerge``). ``$FEDMERGE_MIRROR`` (an
``http(s)://`` or ``file://`` base laid out as ``OWNER/REPO/PATH``) replaces the upstream host.
An archive is written to a temporary file beside its final place, its sha256 is checked, and
only then is it renamed into place: a failed or corrupt download leaves nothing behind, and a
full disk is an error that names the file. The temporary file of a download killed outright
(``kill -9``), named ``.NAME.tmp-PID``, is removed by the next fetch of the same archive once
process PID is gone and the file has not changed for a minute (so that a download by another
machine sharing the cache is left alone; :func:`fedmerge.files.remove_stale_temps`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

from fedmerge.data.domain import cache_write_error
from fedmerge.data.registry import DatasetSpec
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path, remove_stale_temps
from fedmerge.progress import progress_bar

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The cache folder (``$FEDMERGE_DATA`` or ``~/.cache/fedmerge``), created, checked writable."""
    root = Path(os.environ.get("FEDMERGE_DATA") or Path.home() / ".cache" / "fedmerge").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedmergeError(
            f"cannot create the cache directory {root} ({err.strerror}); "
            "set FEDMERGE_DATA to a writable folder"
        ) from err
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise FedmergeError(
            f"the cache directory {root} is not readable and writable; "
            "fix its permissions or set FEDMERGE_DATA to a writable folder"
        )
    return root


def source_url(spec: DatasetSpec) -> str:
    """Where `spec`'s archive comes from: the mirror ``$FEDMERGE_MIRROR`` if set, else upstream."""
    mirror = os.environ.get("FEDMERGE_MIRROR", "").strip()
    if not mirror:
        return spec.url
    if not mirror.startswith(("http://", "https://", "file://")):
        raise FedmergeError(
            f"FEDMERGE_MIRROR={mirror!r} is not a URL; use an http(s):// or file:// base "
            "such as file:///abs/path/to/datasets/"
        )
    return mirror.rstrip("/") + "/" + spec.path


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def archive_path(spec: DatasetSpec) -> Path:
    """Where `spec`'s archive lives in the cache (``raw/OWNER/REPO/PATH``)."""
    return cache_dir() / "raw" / spec.path


def fetch(spec: DatasetSpec, quiet: bool = False) -> Path:
    """Return the verified cached archive of `spec`, downloading it first if needed.

    A cached file whose sha256 no longer matches (damaged cache) is replaced by a fresh download.
    """
    final = archive_path(spec)
    if final.exists():
        if sha256_of(final) == spec.sha256:
            return final
        final.unlink()
    url = source_url(spec)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final)
        with atomic_path(final) as tmp:
            _download(url, tmp, label=spec.name, quiet=quiet)
            got = sha256_of(tmp)
            if got != spec.sha256:
                raise FedmergeError(
                    f"{spec.name}: the archive from {url} has sha256 {got}, expected {spec.sha256} "
                    "(corrupt, truncated or tampered); nothing was cached: check FEDMERGE_MIRROR "
                    "or retry the download"
                )
    # writing the cache failed (a full disk, most often); reading errors are reported below
    except OSError as err:
        raise cache_write_error(final, err) from err
    return final


def _download(url: str, dest: Path, label: str, quiet: bool) -> None:
    """Stream `url` into `dest`, with a progress bar unless `quiet`.

    On a terminal the progress is a bar, otherwise a plain line.
    """
    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - http(s)/file only, checked above
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise FedmergeError(
            f"cannot download {label} from {url} ({reason}); check the network or set "
            "FEDMERGE_MIRROR to a mirror of the archives"
        ) from err
    console = Console(stderr=True, markup=False)
    if not quiet and not console.is_terminal:
        console.print(f"download {label} from {url}", highlight=False, soft_wrap=True)
    with (
        response,
        open(dest, "wb") as out,
        progress_bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            quiet=quiet,
        ) as progress,
    ):
        length = response.headers.get("Content-Length")
        task = progress.add_task(f"download {label}", total=int(length) if length else None)
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as err:
                raise FedmergeError(
                    f"download of {label} from {url} broke off ({err}); nothing was cached: retry"
                ) from err
            if not chunk:
                break
            out.write(chunk)  # an OSError here (full disk) is reported by fetch, naming the file
            progress.advance(task, len(chunk))
