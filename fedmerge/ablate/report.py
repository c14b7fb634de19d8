"""The ablation's table (``ablate.csv``, ``ablate.md``) and figure (``ablate.png``).

One row per setting, target epsilon, method, seed and domain (and, first for each seed, the
untrained start theta_0's): test recall@10 and ndcg@10, the
epsilon spent (the largest over the parties, or the server's for a mechanism that releases at the
server) with its delta, and the run directory. The figure draws recall@10 against epsilon.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from fedmerge.ablate.config import NON_PRIVATE
from fedmerge.ablate.folder import complete
from fedmerge.ablate.grid import Grid, epsilon_text
from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path
from fedmerge.runs.outdir import read_record

COLUMNS = (
    "setting",
    "epsilon_target",
    "method",
    "seed",
    "domain",
    "recall@10",
    "ndcg@10",
    "epsilon_spent",
    "delta",
    "run",
    "note",
)
"""The columns of ``ablate.csv``."""


def spent(record: dict[str, Any]) -> tuple[float, float]:
    """(epsilon, delta) a run spent, from its ``run.json``; (0, 0) for a non-private run.

    The server's when it released the noised value, else the largest over the parties.
    """
    privacy = record.get("privacy") or {}
    by = privacy.get("spent") or {}
    if not by:
        return 0.0, 0.0
    if "server" in by:
        return float(by["server"]["epsilon"]), float(by["server"]["delta"])
    return (
        max(float(v["epsilon"]) for v in by.values()),
        max(float(v["delta"]) for v in by.values()),
    )


BASE = "theta_0"
"""The method name of the rows of the start every run shares (no training, no merge)."""


def table(grid: Grid, out: Path) -> list[dict[str, Any]]:
    """One row per entry and domain, read from the complete run directories in `out`.

    Each seed's rows start with theta_0's (the untrained start, from the seed's first
    non-private run): what training and merging add, and what a privacy setting leaves of it.
    """
    rows: list[dict[str, Any]] = []
    based: set[int] = set()
    for entry in grid.entries:
        head = {
            "setting": entry.setting,
            "epsilon_target": entry.epsilon,
            "method": entry.method,
            "seed": entry.seed,
        }
        if entry.run is None:
            rows += [head | {"domain": d, "note": entry.note} for d in grid.domains]
            continue
        folder = out / "runs" / entry.run.name
        if not complete(folder, entry.run.config):
            raise FedmergeError(f"{folder} holds no complete run; give the same command again")
        if entry.setting == NON_PRIVATE and entry.seed not in based:
            based.add(entry.seed)
            rows += _domain_rows(head | {"method": BASE}, folder, BASE, grid.domains)
        rows += _domain_rows(head, folder, entry.model, grid.domains)
    return rows


def _domain_rows(
    head: dict[str, Any], folder: Path, model: str, domains: list[str]
) -> list[dict[str, Any]]:
    """`head` + the test metrics of `model` on each domain in the run `folder` (its last round)."""
    epsilon, delta = spent(read_record(folder) or {})
    metrics = json.loads((folder / "metrics.json").read_text())
    last = max((int(m.get("round", 1)) for m in metrics), default=1)
    rows = []
    for domain in domains:
        found = [
            m
            for m in metrics
            if m["model"] == model
            and m["domain"] == domain
            and m["split"] == "test"
            and int(m.get("round", 1)) == last
        ]
        row = head | {"domain": domain, "run": f"runs/{folder.name}"}
        if found:
            row |= {
                "recall@10": float(found[0]["recall@10"]),
                "ndcg@10": float(found[0]["ndcg@10"]),
                "epsilon_spent": epsilon,
                "delta": delta,
            }
        else:
            row["note"] = "no result: the domain's parties were left out (see the run)"
        rows.append(row)
    return rows


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return epsilon_text(value) if math.isinf(value) else repr(value)
    return "" if value is None else str(value)


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    """Write ``ablate.csv`` (every digit) and ``ablate.md`` (rounded), each atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([[_cell_text(row.get(c)) for c in COLUMNS] for row in rows])
    with atomic_path(out / "ablate.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(out / "ablate.md") as tmp:
        tmp.write_text(markdown(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown: metrics to 4 decimals, epsilon and delta to 3 significant digits."""
    lines = [
        "# fedmerge ablate",
        "",
        "Test recall@10 and ndcg@10 per domain (each party evaluates on its private test split). "
        "epsilon spent: the largest over the parties, or the server's where the server releases "
        "the noised merge; the non-private rows (target inf) spend nothing and guarantee nothing.",
        "",
        "| " + " | ".join(column.replace("_", " ") for column in COLUMNS) + " |",
        "|---" * len(COLUMNS) + "|",
    ]
    for row in rows:
        cells = [
            row["setting"],
            epsilon_text(row["epsilon_target"]),
            row["method"],
            str(row["seed"]),
            row["domain"],
            *(f"{row[k]:.4f}" if k in row else "–" for k in ("recall@10", "ndcg@10")),
            *(f"{row[k]:.3g}" if k in row else "–" for k in ("epsilon_spent", "delta")),
            row.get("run", "–"),
            row.get("note", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_table(rows: list[dict[str, Any]], grid: Grid, path: Path) -> None:
    """Recall@10 (mean over domains and seeds) against epsilon: a panel per setting.

    One line per merge method; each method's non-private value is a dashed horizontal line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(setting: str, epsilon: float, method: str) -> float | None:
        values = [
            float(r["recall@10"])
            for r in rows
            if r["setting"] == setting
            and r["epsilon_target"] == epsilon
            and r["method"] == method
            and "recall@10" in r
        ]
        return sum(values) / len(values) if values else None

    epsilons = sorted({float(r["epsilon_target"]) for r in rows if r["setting"] != NON_PRIVATE})
    fig, axes = plt.subplots(
        1, len(grid.settings), figsize=(4.2 * len(grid.settings), 3.6), sharey=True, squeeze=False
    )
    colors = {m: f"C{i}" for i, m in enumerate(grid.methods)}
    for ax, setting in zip(axes[0], grid.settings, strict=True):
        impossible = []
        for method in grid.methods:
            points = [(e, v) for e in epsilons if (v := mean(setting, e, method)) is not None]
            if not points:
                impossible.append(method)
                continue
            ax.plot(*zip(*points, strict=True), marker="o", color=colors[method], label=method)
            baseline = mean(NON_PRIVATE, math.inf, method)
            if baseline is not None:
                ax.axhline(baseline, color=colors[method], linestyle="--", linewidth=1)
        base = mean(NON_PRIVATE, math.inf, BASE)
        if base is not None:
            ax.axhline(base, color="grey", linestyle=":", linewidth=1, label="theta_0")
        ax.set_xscale("log")
        ax.set_xticks(epsilons, [epsilon_text(e) for e in epsilons])
        ax.minorticks_off()
        ax.set_title(setting + (f" ({', '.join(impossible)}: not possible)" if impossible else ""))
        ax.set_xlabel("target epsilon")
        ax.legend(fontsize=7, title="dashed: non-private; dotted: theta_0", title_fontsize=7)
    axes[0][0].set_ylabel("test recall@10 (mean over domains, seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
