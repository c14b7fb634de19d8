"""Per-domain quality table: popularity, untrained and pretrained base, fine-tuned from each, joint.

Protocol: each domain's test split (leave-one-out; MergeRec domains use their published split),
full ranking over all items of the domain, seen items not excluded; recall@10 and ndcg@10.
Models use the ``textseq`` preset (plus any ``--set``): *untrained base* is the seeded theta_0;
*pretrained base* is ``fedmerge pretrain`` on the public domains of ``--pretrain`` (not in
the table; its defaults: only the text adaptor trains), evaluated zero-shot; *fine-tuned* is
``fedmerge train --domain D`` from the seeded base, *from pretrained* the same from the
pretrained base (``--init``); *joint* is one model trained on the pooled data of all table
domains. Training time is the wall time of the training epochs (not features or evaluation)
on the machine that ran it.

Each run is kept under ``--runs`` and skipped when already complete (a folder with
``metrics.json``), so the table can be built up over several sessions; ``--skip`` leaves
columns out (shown as "–").

    python benchmarks/domain_quality.py [--domains beauty,sports,toys,pantry,books,movies]
        [--pretrain steam,games] [--runs runs/quality] [--skip joint,...] [--set key=value ...]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

from report import train_once

from fedmerge.config import load_config
from fedmerge.data import load_domain
from fedmerge.evaluate import evaluate_domain
from fedmerge.evaluate.popularity import popularity_scorer
from fedmerge.models import build_model, load_parts
from fedmerge.train.checkpoint import load_checkpoint
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.run import evaluate_rows, pretrain_config

COLUMNS = ("popularity", "base", "pretrained", "fine-tuned", "from pretrained", "joint")
SKIPPABLE = ("fine-tuned", "pretrained", "from pretrained", "joint")


def _facts(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _test_rows(folder: Path) -> dict[tuple[str, str], dict]:
    rows = json.loads((folder / "metrics.json").read_text())
    return {(r["model"], r["domain"]): r for r in rows if r["split"] == "test"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="beauty,sports,toys,pantry,books,movies")
    parser.add_argument("--pretrain", default="steam,games")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"))
    parser.add_argument(
        "--skip",
        type=lambda s: s.split(","),
        default=[],
        help=f"columns to leave out: {', '.join(SKIPPABLE)}",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if unknown := set(args.skip) - set(SKIPPABLE):
        parser.error(
            f"--skip {','.join(sorted(unknown))}: not a column; use {', '.join(SKIPPABLE)}"
        )
    if not args.pretrain:
        args.skip = sorted(set(args.skip) | {"pretrained", "from pretrained"})
    config = load_config("textseq", args.overrides, ExperimentConfig)
    domains = args.domains.split(",")
    cells: dict[str, dict[str, tuple[float, float]]] = {d: {} for d in domains}
    facts: dict[str, dict] = {}
    for name in domains:
        metrics = evaluate_domain(popularity_scorer, load_domain(name, quiet=True), "test")
        cells[name]["popularity"] = (metrics["recall@10"], metrics["ndcg@10"])
        if "fine-tuned" not in args.skip:
            rows = _run([name], config, args.runs / name)
            cells[name]["fine-tuned"] = _cell(rows[("textseq", name)])
            facts[name] = _facts(args.runs / name)
        else:
            parts = load_parts([name], config.model, quiet=True)
            model = build_model(config.model, parts[0].features.shape[1], config.train.seed)
            rows = {
                (r["model"], r["domain"]): r
                for r in evaluate_rows(model, parts, "base")
                if r["split"] == "test"
            }
        cells[name]["base"] = _cell(rows[("base", name)])
        _write(cells, facts, args)
    pretrained = args.runs / "pretrained"
    if "pretrained" not in args.skip or "from pretrained" not in args.skip:
        _run(
            args.pretrain.split(","),
            pretrain_config("textseq", args.overrides),
            pretrained,
            label="pretrained",
        )
        facts["pretrained"] = _facts(pretrained)
    if "pretrained" not in args.skip:
        model, model_config, _ = load_checkpoint(pretrained)
        for row in evaluate_rows(
            model, load_parts(domains, model_config.model, quiet=True), "pretrained"
        ):
            if row["split"] == "test":
                cells[str(row["domain"])]["pretrained"] = _cell(row)
        _write(cells, facts, args)
    if "from pretrained" not in args.skip:
        for name in domains:
            rows = _run([name], config, args.runs / f"{name}-from-pretrained", init=pretrained)
            cells[name]["from pretrained"] = _cell(rows[("textseq", name)])
            facts[f"{name} from pretrained"] = _facts(args.runs / f"{name}-from-pretrained")
            _write(cells, facts, args)
    if "joint" not in args.skip:
        rows = _run(domains, config, args.runs / "joint")
        for (model_name, name), row in rows.items():
            if model_name == "joint":
                cells[name]["joint"] = _cell(row)
        facts["joint"] = _facts(args.runs / "joint")
        _write(cells, facts, args)


def _run(
    names: list[str],
    config: ExperimentConfig,
    folder: Path,
    init: Path | None = None,
    label: str | None = None,
) -> dict[tuple[str, str], dict]:
    """Train `names` into `folder` unless a finished run of `config` is there.

    Returns its test rows by (model, domain).
    """
    train_once(names, config, folder, init, label)
    return _test_rows(folder)


def _cell(row: dict) -> tuple[float, float]:
    return float(row["recall@10"]), float(row["ndcg@10"])


def _write(
    cells: dict[str, dict[str, tuple[float, float]]],
    facts: dict[str, dict],
    args: argparse.Namespace,
) -> None:
    """Write the table so far as Markdown and CSV."""
    header = (
        "| domain | "
        + " | ".join(f"{c} R@10 | {c} N@10" for c in COLUMNS)
        + " | fine-tune time (min) | epochs (best) | stopped by |"
    )
    lines = [header, "|---" * (4 + 2 * len(COLUMNS)) + "|"]
    records = []
    for name, row in cells.items():
        values = [f"{row[c][0]:.4f} | {row[c][1]:.4f}" if c in row else "– | –" for c in COLUMNS]
        lines.append(
            f"| {name} | " + " | ".join(values) + " | " + _run_cells(facts.get(name)) + " |"
        )
        records.append(
            {
                "domain": name,
                **{
                    f"{c}_{m}": row[c][i]
                    for c in COLUMNS
                    if c in row
                    for i, m in enumerate(("recall@10", "ndcg@10"))
                },
                "train_seconds": facts.get(name, {}).get("train_seconds"),
            }
        )
    others = [
        f"- {kind} ({', '.join(facts[kind]['domains'])}): "
        + _run_cells(facts[kind]).replace(" | ", "; ")
        for kind in facts
        if kind not in cells
    ]
    protocol = (__doc__ or "").split("\n\n")[1]
    others_text = (
        (
            "Other runs (training minutes; epochs run (best); stopped by):\n"
            + "\n".join(others)
            + "\n"
        )
        if others
        else ""
    )
    text = (
        f"# Per-domain quality\n\n{protocol}\n\nMachine: {platform.machine()}, "
        f"{platform.python_version()}; settings: {' '.join(args.overrides) or 'preset defaults'}; "
        f"pretrain domains: {args.pretrain}; left out: {', '.join(args.skip) or 'nothing'}.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + others_text
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "domain_quality.md").write_text(text)
    with open(args.out / "domain_quality.csv", "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(dict.fromkeys(k for r in records for k in r))
        )
        writer.writeheader()
        writer.writerows(records)
    print(text)


def _run_cells(facts: dict | None) -> str:
    """Training minutes | epochs run (best epoch) | why training stopped."""
    if facts is None:
        return "– | – | –"
    epochs = sum(1 for h in facts["history"] if "loss" in h)
    return (
        f"{facts['train_seconds'] / 60:.1f} | {epochs} ({facts['best_epoch']}) | {facts['stopped']}"
    )


if __name__ == "__main__":
    main()
