"""A federated run's directory: status, resolved config, event log, results, report, plot, merged model.

The run is written into ``OUT.partial``; ``run.json`` says ``running`` from the start (with
the PID, host and a heartbeat) and ``complete``, ``failed`` or ``interrupted`` at the end. The
results files (``metrics.json`` / ``metrics.csv``, ``report.md``, ``metrics.png``,
``merged.safetensors``, ``coefficients.json``) are written only when the run completed, and
only then does the folder replace ``OUT``: ``OUT`` never presents partial results.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from fedmerge.errors import FedmergeError
from fedmerge.files import atomic_path, write_json
from fedmerge.merge.vectors import StateDict
from fedmerge.runs.outdir import Output
from fedmerge.runs.results import PROTOCOL, Row, write_metrics
from fedmerge.train.checkpoint import save_weights


class RunDir:
    """Keeps ``run.json`` and the event log of a run in ``OUT.partial`` and writes the results at the end.

    A completed run replaces ``OUT`` (:class:`fedmerge.runs.outdir.Output`); a failed or
    interrupted one stays in ``OUT.partial`` with its log, and ``OUT`` keeps the previous run.
    """

    def __init__(self, out: Path, config: dict[str, Any], console: Console | None = None) -> None:
        self.output = Output(Path(out), "simulate", {})
        self.final, self.out = Path(out), self.output.dir
        self.events = self.out / "events.jsonl"
        self.events.write_text("")
        self.console = console
        self.started = time.time()
        self.output.update(machine=f"{platform.machine()}, Python {platform.python_version()}")
        write_json(self.out / "config.json", config)

    @property
    def status(self) -> dict[str, Any]:
        """The run record (``run.json``)."""
        return self.output.record

    def log(self, event: str, **fields: Any) -> None:
        """Append one event (with the seconds since the start) to ``events.jsonl`` and show it."""
        record = {"t": round(time.time() - self.started, 2), "event": event, **fields}
        with open(self.events, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.console is not None:
            details = ", ".join(f"{k} {v}" for k, v in fields.items() if k != "weights")
            line = Text.assemble((f"{record['t']:>8.1f} s", "dim"), f" {event.replace('_', ' ')}: {details}")
            self.console.print(line, highlight=False)

    def finish(self, status: str, **facts: Any) -> None:
        """Record the final status (``complete``: ``OUT.partial`` replaces ``OUT``; ``failed``, ``interrupted``)."""
        facts["seconds"] = round(time.time() - self.started, 2)
        if status == "complete":
            self.output.commit(**facts)
            self.out, self.events = self.final, self.final / "events.jsonl"
        else:
            self.output.end(status, **facts)

    def write_results(self, rows: list[Row], merged: StateDict, coefficients: dict[str, Any], report: str) -> None:
        """The results files (before ``finish("complete")``; refused once the run has ended otherwise)."""
        if self.status["status"] != "running":
            raise FedmergeError(f"the run in {self.out} ended as {self.status['status']!r}; its results are not written")
        save_weights(merged, self.out / "merged.safetensors")
        write_json(self.out / "coefficients.json", coefficients)
        (self.out / "report.md").write_text(report)
        plot_rows(rows, self.out / "metrics.png")
        write_metrics(rows, self.out)


def last_round(rows: list[Row], split: str) -> list[Row]:
    """The rows of `split` from the last round."""
    last = max((int(r.get("round", 1)) for r in rows), default=1)
    return [r for r in rows if r["split"] == split and int(r.get("round", 1)) == last]


def markdown_table(rows: list[Row], split: str = "test", metrics: tuple[str, ...] = ("recall@10", "ndcg@10")) -> str:
    """Models x domains table of `metrics` on `split` (one row per model, the last round's rows)."""
    chosen = last_round(rows, split)
    domains = list(dict.fromkeys(str(r["domain"]) for r in chosen))
    columns = [f"{d} {m}" for d in domains for m in metrics]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model in dict.fromkeys(str(r["model"]) for r in chosen):
        cells = {f"{r['domain']} {m}": float(r[m]) for r in chosen if r["model"] == model for m in metrics}
        lines.append(f"| {model} | " + " | ".join(f"{cells[c]:.4f}" if c in cells else "–" for c in columns) + " |")
    return "\n".join(lines)


def report_text(title: str, rows: list[Row], facts: dict[str, Any]) -> str:
    """The Markdown report: the table (with the text weight each model was evaluated with, where
    the rows have one), the protocol and the run's facts."""
    metrics = ("recall@10", "ndcg@10", *(("text_weight",) if any("text_weight" in r for r in rows) else ()))
    lines = [f"# {title}", "", markdown_table(rows, metrics=metrics), "",
             f"Protocol: test split; {PROTOCOL}. Each party evaluates every model on its own private split; a domain "
             "split across parties is the user-weighted mean.", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[Row], path: Path, split: str = "test", metric: str = "recall@10") -> None:
    """Grouped bars: `metric` per domain for every model (last round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = last_round(rows, split)
    domains = list(dict.fromkeys(str(r["domain"]) for r in chosen))
    models = list(dict.fromkeys(str(r["model"]) for r in chosen))
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains) * max(1, len(models)) / 3, 4))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = {str(r["domain"]): float(r[metric]) for r in chosen if r["model"] == model}
        ax.bar([d + i * width for d in range(len(domains))], [values.get(d, 0.0) for d in domains], width, label=model)
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(domains))], domains)
    ax.set_ylabel(f"{split} {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
