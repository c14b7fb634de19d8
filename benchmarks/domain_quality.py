"""Per-domain quality table: popularity, untrained base, pretrained base, fine-tuned, joint.

Protocol: each domain's test split (leave-one-out; MergeRec domains use their published split),
full ranking over all items of the domain, seen items not excluded; recall@10 and ndcg@10.
Models use the ``textseq`` preset (plus any ``--set``): *untrained base* is the seeded theta_0;
*pretrained base* is ``fedmerge pretrain`` on the public domains of ``--pretrain`` (not in
the table), evaluated zero-shot; *fine-tuned* is ``fedmerge train --domain D`` from the seeded
base; *joint* is one model trained on the pooled data of all table domains. Training time is
the wall time of the training epochs (not features or evaluation) on the machine that ran it.

Each run is kept under ``--runs`` and skipped when already complete (a folder with
``metrics.json``), so the table can be built up over several sessions.

    python benchmarks/domain_quality.py [--domains beauty,sports,toys,pantry,books,movies]
        [--pretrain steam,games] [--runs runs/quality] [--skip-joint] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

from report import finished_run

from fedmerge.config import load_config
from fedmerge.data import load_domain
from fedmerge.evaluate import evaluate_domain
from fedmerge.models.popularity import popularity_scorer
from fedmerge.train.checkpoint import load_checkpoint
from fedmerge.train.run import evaluate_rows, load_parts, train_run

COLUMNS = ("popularity", "base", "pretrained", "fine-tuned", "joint")


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
    parser.add_argument("--skip-joint", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    config = load_config("textseq", args.overrides)
    domains = args.domains.split(",")
    cells: dict[str, dict[str, tuple[float, float]]] = {d: {} for d in domains}
    facts: dict[str, dict] = {}
    for name in domains:
        metrics = evaluate_domain(popularity_scorer, load_domain(name, quiet=True), "test")
        cells[name]["popularity"] = (metrics["recall@10"], metrics["ndcg@10"])
        folder = args.runs / name
        if not finished_run(folder, config):
            train_run([name], config, folder, quiet=True)
        rows = _test_rows(folder)
        cells[name]["base"] = (rows[("base", name)]["recall@10"], rows[("base", name)]["ndcg@10"])
        cells[name]["fine-tuned"] = (rows[("textseq", name)]["recall@10"], rows[("textseq", name)]["ndcg@10"])
        facts[name] = _facts(folder)
        _write(cells, facts, args)
    if args.pretrain:
        folder = args.runs / "pretrained"
        if not finished_run(folder, config):
            train_run(args.pretrain.split(","), config, folder, quiet=True, label="pretrained")
        model, model_config, _ = load_checkpoint(folder)
        for row in evaluate_rows(model, load_parts(domains, model_config.model, quiet=True), "pretrained"):
            if row["split"] == "test":
                cells[str(row["domain"])]["pretrained"] = (float(row["recall@10"]), float(row["ndcg@10"]))
        facts["pretrained"] = _facts(folder)
        _write(cells, facts, args)
    if not args.skip_joint:
        folder = args.runs / "joint"
        if not finished_run(folder, config):
            train_run(domains, config, folder, quiet=True)
        for (model, name), row in _test_rows(folder).items():
            if model == "joint":
                cells[name]["joint"] = (row["recall@10"], row["ndcg@10"])
        facts["joint"] = _facts(folder)
        _write(cells, facts, args)


def _write(cells: dict[str, dict[str, tuple[float, float]]], facts: dict[str, dict], args: argparse.Namespace) -> None:
    """Write the table so far as Markdown and CSV."""
    header = ("| domain | " + " | ".join(f"{c} R@10 | {c} N@10" for c in COLUMNS)
              + " | fine-tune time (min) | epochs (best) | stopped by |")
    lines = [header, "|---" * (4 + 2 * len(COLUMNS)) + "|"]
    records = []
    for name, row in cells.items():
        values = [f"{row[c][0]:.4f} | {row[c][1]:.4f}" if c in row else "– | –" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(values) + " | " + _run_cells(facts.get(name)) + " |")
        records.append({"domain": name, **{f"{c}_{m}": row[c][i] for c in COLUMNS if c in row
                                           for i, m in enumerate(("recall@10", "ndcg@10"))},
                        "train_seconds": facts.get(name, {}).get("train_seconds")})
    others = [f"- {kind} ({', '.join(facts[kind]['domains'])}): " + _run_cells(facts[kind]).replace(" | ", "; ")
              for kind in ("pretrained", "joint") if kind in facts]
    protocol = (__doc__ or "").split("\n\n")[1]
    others_text = ("Other runs (training minutes; epochs run (best); stopped by):\n" + "\n".join(others) + "\n") if others else ""
    text = (f"# Per-domain quality\n\n{protocol}\n\nMachine: {platform.machine()}, {platform.python_version()}; "
            f"settings: {' '.join(args.overrides) or 'preset defaults'}; pretrain domains: {args.pretrain}.\n\n"
            + "\n".join(lines) + "\n\n" + others_text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "domain_quality.md").write_text(text)
    with open(args.out / "domain_quality.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
        writer.writeheader()
        writer.writerows(records)
    print(text)


def _run_cells(facts: dict | None) -> str:
    """Training minutes | epochs run (best epoch) | why training stopped."""
    if facts is None:
        return "– | – | –"
    epochs = sum(1 for h in facts["history"] if "loss" in h)
    return f"{facts['train_seconds'] / 60:.1f} | {epochs} ({facts['best_epoch']}) | {facts['stopped']}"


if __name__ == "__main__":
    main()
