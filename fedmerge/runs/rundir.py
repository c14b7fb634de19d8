"""A federated run's directory.

Status, resolved config, event log, results, report, plot, merged model.

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
from fedmerge.evaluate import metric_names
from fedmerge.files import atomic_path, write_json
from fedmerge.models import StateDict
from fedmerge.progress import Status, attach, detach
from fedmerge.runs.outdir import Output
from fedmerge.runs.results import Row, protocol_text, write_metrics
from fedmerge.train.checkpoint import save_weights


class RunDir:
    """Keeps ``run.json`` and the event log of a run in ``OUT.partial``, writes the results.

    The results are written at the end.

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
        self.screen = RunScreen(console, self.started) if console is not None else None
        self.output.update(machine=f"{platform.machine()}, Python {platform.python_version()}")
        write_json(self.out / "config.json", config)

    @property
    def status(self) -> dict[str, Any]:
        """The run record (``run.json``)."""
        return self.output.record

    def log(self, event: str, **fields: Any) -> None:
        """Append one event to ``events.jsonl``, unrounded, and show it rounded on the console.

        The event gets the seconds since the start; the console is the :class:`RunScreen`.
        """
        record = {"t": round(time.time() - self.started, 2), "event": event, **fields}
        with open(self.events, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.screen is not None:
            self.screen.show(record)

    def finish(self, status: str, **facts: Any) -> None:
        """Record the final status.

        ``complete``: ``OUT.partial`` replaces ``OUT``; or ``failed``, ``interrupted``.
        """
        facts["seconds"] = round(time.time() - self.started, 2)
        if self.screen is not None:
            self.screen.close()
        if status == "complete":
            self.output.commit(**facts)
            self.out, self.events = self.final, self.final / "events.jsonl"
        else:
            self.output.end(status, **facts)

    def write_results(
        self, rows: list[Row], merged: StateDict, coefficients: dict[str, Any], report: str
    ) -> None:
        """The results files.

        Written before ``finish("complete")``; refused once the run has ended otherwise.
        """
        if self.status["status"] != "running":
            raise FedmergeError(
                f"the run in {self.out} ended as {self.status['status']!r}; its results are not "
                "written"
            )
        save_weights(merged, self.out / "merged.safetensors")
        write_json(self.out / "coefficients.json", coefficients)
        (self.out / "report.md").write_text(report)
        plot_rows(rows, self.out / "metrics.png")
        write_metrics(rows, self.out)


RESULT_FILES = (
    "report.md, metrics.csv, metrics.png, merged.safetensors, coefficients.json, events.jsonl"
)


class RunScreen:
    """What a person reads of a run: one line per event, numbers rounded.

    The results table comes at the end.

    Each line starts with the seconds since the start; metrics and losses show 4 decimals, seconds
    one (``events.jsonl`` keeps every value unrounded). On a terminal a status line shows the phase
    the run waits in (start-up, local training, evaluation) with its elapsed time, and the learned
    merge draws its bar; off a terminal (a file, a pipe) every line is plain text, the merge
    prints a line at each quarter of its steps. Values are printed as text, never as markup.
    """

    def __init__(self, console: Console, started: float) -> None:
        self.console, self.started = console, started
        self.status = Status(console)
        self.phase, self.expected, self.arrived = "", 0, 0
        self.domains: list[str] = []
        attach(console, self.line, self.status)

    def show(self, record: dict[str, Any]) -> None:
        """Show one event of the run.

        A known event as a sentence, any other as its rounded fields.
        """
        render = getattr(self, f"_on_{record['event']}", None)
        text = render(record) if render is not None else self._generic(record)
        if text:
            self.line(text, record["t"], "red" if record["event"] == "party_failed" else "")

    def line(self, text: str, t: float | None = None, style: str = "") -> None:
        """One line: the seconds since the start, then `text`."""
        t = time.time() - self.started if t is None else t
        self.console.print(
            Text.assemble((f"{t:>7.1f} s", "dim"), "  ", (text, style)),
            highlight=False,
            soft_wrap=True,
        )

    def results(self, rows: list[Row], out: Path) -> None:
        """The models x domains table of test recall@10 and ndcg@10, and the run directory.

        The table is the one in ``report.md``.
        """
        self.console.print(
            Text(f"\nResults: test recall@10 and ndcg@10 per domain; {protocol_text(rows)}.\n"),
            soft_wrap=True,
            highlight=False,
        )
        self.console.print(Text(markdown_table(rows)), soft_wrap=True, highlight=False)
        self.console.print(
            Text(f"\nrun directory: {out} ({RESULT_FILES})"), soft_wrap=True, highlight=False
        )

    def close(self) -> None:
        """The run ended: no status line, progress bars go back to stderr."""
        self.status.stop()
        detach()

    def _wait(self, label: str, expected: int) -> None:
        """A phase that waits for `expected` replies begins."""
        self.phase, self.expected, self.arrived = label, expected, 0
        self.status.show(f"{label}: 0 of {expected} done", restart=True)

    def _arrived(self) -> None:
        self.arrived += 1
        self.status.show(f"{self.phase}: {self.arrived} of {self.expected} done")

    def _on_runtime_start(self, r: dict[str, Any]) -> str:
        self.status.show("start-up: Flower's simulation runtime (Ray)", restart=True)
        where = "" if r.get("ray", "local") == "local" else f" on the cluster at {r['ray']}"
        return f"start-up: Flower's simulation runtime (Ray{where}), {r['nodes']} nodes"

    def _on_data_start(self, r: dict[str, Any]) -> str:
        self._wait(
            "start-up: the parties load their data", len(r["domains"]) * int(r.get("shards", 1))
        )
        return (
            f"start-up: the parties load their data ({', '.join(r['domains'])}: download, item "
            "features)"
        )

    def _on_party_ready(self, r: dict[str, Any]) -> str:
        self._arrived()
        return f"  {r['party']} ready: {int(r['n_items']):,} items"

    def _on_parties(self, r: dict[str, Any]) -> str:
        self.status.stop()
        return f"start-up done: {len(r['parties'])} parties"

    def _on_strategy(self, r: dict[str, Any]) -> None:
        return None  # Flower's strategy object: nothing a person needs

    def _on_train_start(self, r: dict[str, Any]) -> str:
        self._wait(f"round {r['round']}: local training", int(r["parties"]))
        return f"round {r['round']}: local training on {r['parties']} parties"

    def _on_party_trained(self, r: dict[str, Any]) -> str:
        self._arrived()
        said = []
        if "epochs" in r:
            best = f" (best {int(r['best_epoch'])})" if "best_epoch" in r else ""
            said.append(f"{int(r['epochs'])} epochs{best}")
        if r.get("last_loss") is not None:
            said.append(f"last loss {r['last_loss']:.4f}")
        if "best_valid_ndcg@10" in r:
            said.append(f"best valid ndcg@10 {r['best_valid_ndcg@10']:.4f}")
        if "epsilon" in r:
            said.append(f"epsilon {r['epsilon']:.3g} at delta {r['delta']:.3g}")
        said.append(f"{r['seconds']:.1f} s")
        return f"  {r['party']} trained: " + ", ".join(said)

    def _on_party_failed(self, r: dict[str, Any]) -> str:
        return f"  {r['party']} left out: {r['error']}"

    def _on_train_done(self, r: dict[str, Any]) -> str:
        self.status.stop()
        return (
            f"round {r['round']}: local training done, {r['replied']} of "
            f"{self.expected or r['replied']} parties replied"
        )

    def _on_merge_start(self, r: dict[str, Any]) -> str:
        self.status.stop()
        self.domains = list(r["domains"])
        return f"round {r['round']}: the server merges {', '.join(self.domains)}"

    def _on_merge_done(self, r: dict[str, Any]) -> str:
        text = f"round {r['round']}: merged in {r['seconds']:.1f} s"
        selection = r.get("selection")
        if selection:
            pick = list(zip(selection["steps"], selection["scales"], strict=True)).index(
                (selection["chosen_step"], selection["chosen_scale"])
            )
            scale = "" if selection["chosen_scale"] == 1.0 else f" x {selection['chosen_scale']:g}"
            text += (
                f", kept step {selection['chosen_step']}{scale} (mean valid ndcg@10 "
                f"{selection['scores'][pick]:.4f}, the best of {len(selection['steps'])} "
                "candidates)"
            )
        weights = r.get("weights") or []
        if len(weights) == len(self.domains):
            text += "; coefficients " + ", ".join(
                f"{d} {_plain(w[0] if len(w) == 1 else w)}"
                for d, w in zip(self.domains, weights, strict=True)
            )
        return text

    def _on_evaluate_start(self, r: dict[str, Any]) -> str:
        self._wait(f"round {r['round']}: evaluation", int(r["parties"]))
        return (
            f"round {r['round']}: every party evaluates {len(r['models'])} models on its private "
            f"{' and '.join(r['splits'])} split"
        )

    def _on_party_evaluated(self, r: dict[str, Any]) -> str:
        if r.get("valid_selection"):
            return (
                f"  {r['party']} scored {r['models']} candidate merges on its valid users, "
                f"{r['seconds']:.1f} s"
            )
        self._arrived()
        return f"  {r['party']} evaluated {r['models']} models, {r['seconds']:.1f} s"

    def _on_round_done(self, r: dict[str, Any]) -> str:
        self.status.stop()
        seconds = ", ".join(f"{step} {value:.1f} s" for step, value in r["seconds"].items())
        left = f"; left out: {', '.join(r['failed'])}" if r.get("failed") else ""
        return f"round {r['round']} done: {seconds}{left}"

    def _on_weave_local_start(self, r: dict[str, Any]) -> str:
        return f"own adapters: each of {r['parties']} parties fine-tunes its own"

    def _on_weave_hybrids_start(self, r: dict[str, Any]) -> str:
        return (
            f"weaving {', '.join(r['hybrids'])}: {r['legs']} legs of {r['steps']} steps each, "
            "routed between the parties"
        )

    def _on_weave_fedavg_start(self, r: dict[str, Any]) -> str:
        return f"FedAvg adapter: {r['rounds']} rounds of one leg at each of {r['parties']} parties"

    def _on_weave_evaluate_start(self, r: dict[str, Any]) -> str:
        return f"the target party ({r['target']}) evaluates {len(r['models'])} models"

    def _on_weave_done(self, r: dict[str, Any]) -> str:
        return "woven run done: " + ", ".join(
            f"{step} {value:.1f} s" for step, value in r["seconds"].items()
        )

    def _generic(self, r: dict[str, Any]) -> str:
        details = ", ".join(
            f"{key} {_plain(value)}" for key, value in r.items() if key not in ("t", "event")
        )
        return f"{str(r['event']).replace('_', ' ')}: {details}"


def _plain(value: Any) -> str:
    """A value as short text: floats with 4 decimals, lists and dicts element by element."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    return str(value)


def last_round(rows: list[Row], split: str) -> list[Row]:
    """The rows of `split` from the last round."""
    last = max((int(r.get("round", 1)) for r in rows), default=1)
    return [r for r in rows if r["split"] == split and int(r.get("round", 1)) == last]


def markdown_table(
    rows: list[Row], split: str = "test", metrics: tuple[str, ...] = ("recall@10", "ndcg@10")
) -> str:
    """Models x domains table of `metrics` on `split` (one row per model, the last round's rows)."""
    chosen = last_round(rows, split)
    domains = list(dict.fromkeys(str(r["domain"]) for r in chosen))
    columns = [f"{d} {m}" for d in domains for m in metrics]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model in dict.fromkeys(str(r["model"]) for r in chosen):
        cells = {
            f"{r['domain']} {m}": float(r[m])
            for r in chosen
            if r["model"] == model
            for m in metrics
        }
        lines.append(
            f"| {model} | "
            + " | ".join(f"{cells[c]:.4f}" if c in cells else "–" for c in columns)
            + " |"
        )
    return "\n".join(lines)


def report_text(title: str, rows: list[Row], facts: dict[str, Any]) -> str:
    """The Markdown report: the table, the protocol and the run's facts.

    The table holds the facts each model was evaluated with, such as a family's calibrated value,
    where the rows have them.
    """
    known = {
        "model",
        "domain",
        "split",
        "users",
        "round",
        "exclude_seen",
        "protocol",
        *metric_names(),
    }
    metrics = ("recall@10", "ndcg@10", *dict.fromkeys(k for r in rows for k in r if k not in known))
    lines = [
        f"# {title}",
        "",
        markdown_table(rows, metrics=metrics),
        "",
        f"Protocol: test split; {protocol_text(rows)}. Each party evaluates every model on its own "
        "private split; a domain split across parties is the user-weighted mean.",
        "",
    ]
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
        ax.bar(
            [d + i * width for d in range(len(domains))],
            [values.get(d, 0.0) for d in domains],
            width,
            label=model,
        )
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(domains))], domains)
    ax.set_ylabel(f"{split} {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
