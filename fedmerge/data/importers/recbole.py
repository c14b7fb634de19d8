r"""RecBole atomic files: ``NAME.inter`` (+ optional ``NAME.item``), with ``field:type`` headers.

The files are tab-separated.

Import: each user's interactions are ordered by ``timestamp`` (stable; file order without a
timestamp column), then split leave-one-out. Item text comes from the ``.item`` file: a field
whose name contains ``title`` is the title, ``brand`` the brand, ``categories``/``category``
the category. Export writes the same two files, with each user's position in time as its
timestamp, so that export followed by import gives back the same domain.

What cannot be read faithfully is refused with the file and line: a row whose number of
tab-separated fields differs from the header's (a value holding a tab, or a line break that
turned a title's tail into a row of its own), a timestamp that is not a finite number, a
file that is not UTF-8, and a file without interactions. Rows that repeat another row exactly
(every field, timestamp included) are logged twice, not interactions twice: they are dropped,
and their number is kept in the domain's ``source`` as ``duplicate_rows_dropped``. Without a
timestamp column, repeated rows are repeat interactions in file order and are kept.

Export writes each text value with its whitespace (tabs, line breaks, runs of spaces)
collapsed to single spaces, since the tab-separated lines cannot carry it: a title
``"a\tb\nc"`` comes back as ``"a b c"``, and every other field of the domain unchanged. Ids
holding such whitespace cannot be collapsed without merging ids, so they are refused.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from fedmerge.data.domain import DomainData, from_sequences, full_sequences
from fedmerge.data.importers.safe_io import read_regular
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path


def _find(path: Path, suffix: str) -> Path | None:
    """The single ``*.suffix`` file at `path` (a folder, or a file of that atomic-file set)."""
    if path.is_file():
        candidate = path.with_suffix(suffix)
        return candidate if candidate.exists() else None
    found = sorted(path.glob(f"*{suffix}"))
    if len(found) > 1:
        raise FedmergeError(
            f"{path} holds several {suffix} files ({', '.join(f.name for f in found)}); "
            "give the path of the one to import"
        )
    return found[0] if found else None


def _field_names(header: list[str], path: Path) -> list[str]:
    """The field names of a header line (``name:type`` each, type suffix dropped)."""
    names = []
    for column in header:
        name, sep, kind = column.partition(":")
        if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
            raise FedmergeError(
                f"{path}: header field {column!r} is not 'name:type' with type token, token_seq, "
                "float or float_seq; this is not a RecBole atomic file"
            )
        if name in names:
            raise FedmergeError(
                f"{path}: header field {name!r} appears twice; give each field one column"
            )
        names.append(name)
    return names


def _read_atomic(path: Path) -> pd.DataFrame:
    """Read one atomic file: columns named by field (type suffix dropped), indexed by line number.

    Every row must have as many tab-separated fields as the header; blank lines are skipped.
    """
    data = read_regular(path, "a RecBole atomic file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        at = data[: err.start].count(b"\n") + 1
        raise FedmergeError(
            f"{path}, line {at}: the text is not UTF-8; save the file as UTF-8"
        ) from err
    lines = text.split("\n")
    names = _field_names(lines[0].removesuffix("\r").split("\t"), path)
    rows, numbers = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not (line := line.removesuffix("\r")):
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise FedmergeError(
                f"{path}, line {number}: {len(fields)} tab-separated fields where the header has "
                f"{len(names)}; a value holds a tab or a line break, or a field is missing: fix "
                "that line"
            )
        rows.append(fields)
        numbers.append(number)
    return pd.DataFrame(rows, columns=names, index=pd.Index(numbers, dtype=np.int64), dtype=str)


def _check_ids(frame: pd.DataFrame, columns: tuple[str, ...], path: Path | None) -> None:
    """Refuse a row with an empty id, naming its line."""
    for column in columns:
        empty = (frame[column] == "").to_numpy()
        if empty.any():
            raise FedmergeError(
                f"{path}, line {frame.index[int(empty.argmax())]}: empty {column}; "
                f"every row needs a value in {' and '.join(columns)}"
            )


def _time_order(inter: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, int]:
    """Rows in (stable) time order, exact duplicates dropped, and how many were dropped."""
    stamps = pd.to_numeric(inter["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(stamps)
    if bad.any():
        row = int(bad.argmax())
        raise FedmergeError(
            f"{path}, line {inter.index[row]}: timestamp {inter['timestamp'].iloc[row]!r} is not a "
            "finite number; give every row a numeric timestamp"
        )
    duplicated = inter.duplicated().to_numpy()
    inter = inter.assign(_t=stamps)[~duplicated]
    return inter.sort_values("_t", kind="stable"), int(duplicated.sum())


def _text_column(columns: list[str], field: str) -> str | None:
    """Which `.item` column holds text `field`."""
    if field == "title":
        return next((c for c in columns if "title" in c), None)
    if field == "category":
        return next((c for c in columns if c in ("categories", "category")), None)
    return field if field in columns else None


def read_recbole(path: Path, name: str) -> DomainData:
    """Import RecBole atomic files as domain `name`.

    `path` is a folder with one ``.inter`` file, or the ``.inter`` file itself.
    """
    inter_path = _find(path, ".inter")
    if inter_path is None:
        raise FedmergeError(
            f"{path} holds no .inter file; a RecBole dataset is NAME.inter (+ NAME.item)"
        )
    inter = _read_atomic(inter_path)
    if not {"user_id", "item_id"} <= set(inter.columns):
        raise FedmergeError(f"{inter_path} lacks a user_id:token or item_id:token column")
    _check_ids(inter, ("user_id", "item_id"), inter_path)
    source = {"format": "recbole", "path": str(inter_path)}
    if "timestamp" in inter.columns:
        inter, dropped = _time_order(inter, inter_path)
        if dropped:
            source["duplicate_rows_dropped"] = str(dropped)
    item_path = _find(path, ".item")
    items = (
        _read_atomic(item_path)
        if item_path is not None
        else pd.DataFrame({"item_id": []}, dtype=str)
    )
    if "item_id" not in items.columns:
        raise FedmergeError(f"{item_path} lacks an item_id:token column")
    _check_ids(items, ("item_id",), item_path)
    item_ids = list(dict.fromkeys([*items["item_id"], *inter["item_id"]]))
    index = {item: pos for pos, item in enumerate(item_ids)}
    lookup = items.drop_duplicates("item_id").set_index("item_id")
    text = {}
    for field in ("title", "brand", "category"):
        column = _text_column(list(lookup.columns), field)
        if column is not None:
            text[field] = lookup[column].reindex(item_ids, fill_value="").tolist()
    user_ids = list(dict.fromkeys(inter["user_id"]))
    grouped = (
        inter.assign(_i=inter["item_id"].map(index)).groupby("user_id", sort=False)["_i"].agg(list)
    )
    sequences = [grouped[user] for user in user_ids]
    return from_sequences(name, item_ids, text, user_ids, sequences, source=source)


def _clean(value: str) -> str:
    """Atomic files are tab-separated lines: tabs and newlines inside a value become spaces."""
    return " ".join(value.split())


def write_recbole(domain: DomainData, directory: Path) -> list[Path]:
    """Export `domain` as ``directory/NAME.inter`` and ``directory/NAME.item``; return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inter_path, item_path = directory / f"{domain.name}.inter", directory / f"{domain.name}.item"
    for kind, ids in (("user", domain.user_ids), ("item", domain.item_ids)):
        bad = next((i for i in ids if i != _clean(i) or not i), None)
        if bad is not None:
            raise FedmergeError(
                f"{kind} id {bad!r} of {domain.name} is empty or holds whitespace other than "
                "single spaces, which RecBole's tab-separated files cannot carry"
            )
    rows = [
        (domain.user_ids[user], domain.item_ids[item], float(t))
        for user, seq in enumerate(full_sequences(domain))
        for t, item in enumerate(seq)
    ]
    inter = pd.DataFrame(rows, columns=["user_id:token", "item_id:token", "timestamp:float"])
    fields = {
        "title": "title:token_seq",
        "brand": "brand:token",
        "category": "categories:token_seq",
    }
    items = pd.DataFrame(
        {"item_id:token": domain.item_ids}
        | {fields[key]: [_clean(v) for v in values] for key, values in domain.item_text.items()}
    )
    for frame, target in ((inter, inter_path), (items, item_path)):
        with atomic_path(target) as tmp:
            frame.to_csv(tmp, sep="\t", index=False, quoting=csv.QUOTE_NONE, escapechar=None)
    return [inter_path, item_path]
