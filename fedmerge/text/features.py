"""Per-domain item-feature tables: the frozen text encoding of every item, cached on disk.

An item's text is ``title: ... brand: ... category: ...`` (the fields it has; each value cut
to its first 32 words), as in MergeRec's text backbones. The table is cached under
``$FEDMERGE_DATA/features/<encoder name>/<sha256 of the texts>.npy``: the same encoder on the
same catalogue text is computed once, whichever domain name it came under. A cached table
that cannot be read back, or is not a finite float32 table of the right shape, is reported on
stderr and computed again; a failed write (full disk) is an error naming the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from fedmerge.data.domain import TEXT_FIELDS, DomainData, cache_write_error
from fedmerge.data.download import cache_dir
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path
from fedmerge.progress import progress_bar
from fedmerge.text.encoders import TextEncoder

_MAX_WORDS = 32


def item_texts(domain: DomainData) -> list[str]:
    """One text per item: ``field: value`` for each non-empty text field, joined by spaces."""
    fields = [key for key in TEXT_FIELDS if key in domain.item_text]
    texts = []
    for item in range(domain.n_items):
        parts = [
            f"{key}: {' '.join(value.split()[:_MAX_WORDS])}"
            for key in fields
            if (value := domain.item_text[key][item].strip())
        ]
        texts.append(" ".join(parts))
    return texts


def feature_table(
    domain: DomainData, encoder: TextEncoder, batch_size: int = 64, quiet: bool = False
) -> np.ndarray:
    """The (n_items, dim) float32 feature table of `domain` under `encoder`, cached.

    Read from the cache if it is there.

    Items without any text get a zero vector (they can only be recommended by what the model
    learns elsewhere); a domain where no item has text is an error.
    """
    texts = item_texts(domain)
    if not any(texts):
        raise FedmergeError(
            f"domain {domain.name!r} has no item text (title, brand or category), so a text-based "
            "model cannot represent its items; import it with an item file that has titles"
        )
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:24]
    path = cache_dir() / "features" / encoder.name / f"{digest}.npy"
    cached = _read_cached(path, (domain.n_items, encoder.dim))
    if cached is not None:
        return cached
    table = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    # longest first, so that each batch pads to similar lengths (and the time estimate is
    # pessimistic)
    with_text = sorted((i for i, text in enumerate(texts) if text), key=lambda i: -len(texts[i]))
    with progress_bar(
        TextColumn(f"[bold]features {domain.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        quiet=quiet,
    ) as progress:
        task = progress.add_task("encode", total=len(with_text))
        for start in range(0, len(with_text), batch_size):
            rows = with_text[start : start + batch_size]
            table[rows] = encoder.encode([texts[i] for i in rows])
            progress.advance(task, len(rows))
    _write_cached(path, table)
    return table


def _read_cached(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached table at `path`, or None when there is none or it is corrupt.

    A corrupt table is reported on stderr.
    """
    if not path.exists():
        return None
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        problem = f"unreadable: {err}"
    else:
        if table.shape == shape and table.dtype == np.float32 and np.isfinite(table).all():
            return table
        problem = (
            f"a {table.dtype} table of shape {table.shape} where a finite float32 {shape} was "
            "expected"
        )
    Console(stderr=True, markup=False, highlight=False, soft_wrap=True).print(
        f"warning: the cached feature table {path} is corrupt ({problem}); computing it again"
    )
    return None


def _write_cached(path: Path, table: np.ndarray) -> None:
    """Write `table` to `path` atomically; a failed write leaves nothing and names the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, table)
    except OSError as err:
        raise cache_write_error(path, err) from err
