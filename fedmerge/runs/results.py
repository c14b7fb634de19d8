"""Metric rows: one schema for every command that evaluates, written as JSON and CSV.

A row is ``{"model", "domain", "split", "recall@1", ..., "mrr@50", "users"}``: one model
evaluated on one domain's split (full ranking over the domain's items).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.table import Table

from fedmerge.files import atomic_path, write_json

Row = dict[str, str | float | int | bool]


def protocol_text(rows: Sequence[Row] = ()) -> str:
    """How `rows` were ranked, in words.

    From their ``protocol`` column; full ranking when they have none.
    """
    ranked = list(dict.fromkeys(str(r.get("protocol", "full")) for r in rows)) or ["full"]
    ranking = "; ".join(
        "full ranking over all items of the domain"
        if p == "full"
        else f"each target ranked among {p} (sorted by item id, the same lists for every model)"
        for p in ranked
    )
    return (
        f"leave-one-out (valid = second-to-last item, test = last); {ranking}; seen items not "
        "excluded unless stated; ties broken by item index"
    )


def metric_row(
    model: str, domain: str, split: str, metrics: dict[str, float], protocol: str = "full"
) -> Row:
    """One results row; ``protocol`` is how it was ranked.

    See :meth:`fedmerge.evaluate.EvalProtocol.name`.
    """
    return {"model": model, "domain": domain, "split": split, **metrics, "protocol": protocol}


def write_metrics(rows: Sequence[Row], directory: Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` (a list of rows) and ``metrics.csv`` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    json_path, csv_path = directory / "metrics.json", directory / "metrics.csv"
    write_json(json_path, list(rows))
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


TABLE_METRICS: tuple[str, ...] = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def metrics_table(
    rows: Sequence[Row], metrics: Sequence[str] = TABLE_METRICS, title: str | None = None
) -> Table:
    """A rich table of a few headline metrics per row (the files hold every metric)."""
    short = {"recall": "R", "ndcg": "N", "mrr": "MRR"}
    table = Table(
        title=title,
        caption=f"R = recall, N = ndcg. {protocol_text(rows)}",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("model", "domain", "split", "users"):
        table.add_column(column, justify="right" if column == "users" else "left", no_wrap=True)
    for name in metrics:
        metric, k = name.split("@")
        table.add_column(
            f"{short.get(metric, metric)}@{k}", justify="right", no_wrap=True, min_width=6
        )
    for row in rows:
        table.add_row(
            str(row["model"]),
            str(row["domain"]),
            str(row["split"]),
            f"{int(row.get('users', 0)):,}",
            *(f"{float(row[n]):.4f}" for n in metrics),
        )
    return table
