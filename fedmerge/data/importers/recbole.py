"""RecBole atomic files: ``NAME.inter`` (+ optional ``NAME.item``), tab-separated, ``field:type`` headers.

Import: each user's interactions are ordered by ``timestamp`` (stable; file order without a
timestamp column), then split leave-one-out. Item text comes from the ``.item`` file: a field
whose name contains ``title`` is the title, ``brand`` the brand, ``categories``/``category``
the category. Export writes the same two files, with each user's position in time as its
timestamp, so that export followed by import gives back the same domain.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from fedmerge.data.domain import DomainData, from_sequences, full_sequences
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path


def _find(path: Path, suffix: str) -> Path | None:
    """The single ``*.suffix`` file at `path` (a folder, or a file of that atomic-file set)."""
    if path.is_file():
        candidate = path.with_suffix(suffix)
        return candidate if candidate.exists() else None
    found = sorted(path.glob(f"*{suffix}"))
    if len(found) > 1:
        raise FedmergeError(f"{path} holds several {suffix} files ({', '.join(f.name for f in found)}); "
                            "give the path of the one to import")
    return found[0] if found else None


def _read_atomic(path: Path) -> pd.DataFrame:
    """Read one atomic file; columns are renamed to their field names (type suffix dropped)."""
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise FedmergeError(f"{path} is not a RecBole atomic file ({err})") from err
    fields = {}
    for column in frame.columns:
        name, sep, kind = column.partition(":")
        if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
            raise FedmergeError(f"{path}: header field {column!r} is not 'name:type' with type token, token_seq, "
                                "float or float_seq; this is not a RecBole atomic file")
        fields[column] = name
    return frame.rename(columns=fields)


def _text_column(columns: list[str], field: str) -> str | None:
    """Which `.item` column holds text `field`."""
    if field == "title":
        return next((c for c in columns if "title" in c), None)
    if field == "category":
        return next((c for c in columns if c in ("categories", "category")), None)
    return field if field in columns else None


def read_recbole(path: Path, name: str) -> DomainData:
    """Import RecBole atomic files (a folder with one ``.inter``, or the ``.inter`` file) as domain `name`."""
    inter_path = _find(path, ".inter")
    if inter_path is None:
        raise FedmergeError(f"{path} holds no .inter file; a RecBole dataset is NAME.inter (+ NAME.item)")
    inter = _read_atomic(inter_path)
    if not {"user_id", "item_id"} <= set(inter.columns):
        raise FedmergeError(f"{inter_path} lacks a user_id:token or item_id:token column")
    for column in ("user_id", "item_id"):
        if (inter[column] == "").any():
            line = int((inter[column] == "").to_numpy().argmax()) + 2
            raise FedmergeError(f"{inter_path}, line {line}: empty {column}; every row needs a user_id and an item_id")
    if "timestamp" in inter.columns:
        try:
            stamps = inter["timestamp"].astype(float)
        except ValueError as err:
            raise FedmergeError(f"{inter_path}: a timestamp is not a number ({err})") from err
        inter = inter.assign(_t=stamps).sort_values("_t", kind="stable")
    item_path = _find(path, ".item")
    items = _read_atomic(item_path) if item_path is not None else pd.DataFrame({"item_id": []}, dtype=str)
    if "item_id" not in items.columns:
        raise FedmergeError(f"{item_path} lacks an item_id:token column")
    item_ids = list(dict.fromkeys([*items["item_id"], *inter["item_id"]]))
    index = {item: pos for pos, item in enumerate(item_ids)}
    lookup = items.drop_duplicates("item_id").set_index("item_id")
    text = {}
    for field in ("title", "brand", "category"):
        column = _text_column(list(lookup.columns), field)
        if column is not None:
            text[field] = lookup[column].reindex(item_ids, fill_value="").tolist()
    user_ids = list(dict.fromkeys(inter["user_id"]))
    grouped = inter.assign(_i=inter["item_id"].map(index)).groupby("user_id", sort=False)["_i"].agg(list)
    sequences = [grouped[user] for user in user_ids]
    return from_sequences(name, item_ids, text, user_ids, sequences,
                          source={"format": "recbole", "path": str(inter_path)})


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
            raise FedmergeError(f"{kind} id {bad!r} of {domain.name} is empty or holds whitespace other than single "
                                "spaces, which RecBole's tab-separated files cannot carry")
    rows = [(domain.user_ids[user], domain.item_ids[item], float(t))
            for user, seq in enumerate(full_sequences(domain)) for t, item in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id:token", "item_id:token", "timestamp:float"])
    fields = {"title": "title:token_seq", "brand": "brand:token", "category": "categories:token_seq"}
    items = pd.DataFrame({"item_id:token": domain.item_ids}
                         | {fields[key]: [_clean(v) for v in values] for key, values in domain.item_text.items()})
    for frame, target in ((inter, inter_path), (items, item_path)):
        with atomic_path(target) as tmp:
            frame.to_csv(tmp, sep="\t", index=False, quoting=csv.QUOTE_NONE, escapechar=None)
    return [inter_path, item_path]
