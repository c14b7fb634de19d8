"""Merging benchmark: fine-tuned, joint, training-free merges and learned (MergeRec) merges.

Protocol: each domain's test split (leave-one-out; MergeRec domains use their published split), full
ranking over all items of the domain, seen items not excluded; recall@10 and ndcg@10, mean +- std
over seeds. Per seed and base regime, every domain is fine-tuned from the same base theta_0
(``seeded``: the seeded init; ``pretrained``: ``fedmerge pretrain`` on the ``--pretrain`` domains
with that seed and its defaults, so only the text adaptor trains unless ``--set train.frozen=[]``),
then merged. *fine-tuned (own)* is each domain's model on its own domain; *joint* one model trained
on the pooled data (the non-private reference); *task_arithmetic* picks lambda from {0.1, 0.2, 0.3,
0.5, 0.7, 1.0} by mean valid ndcg@10; *ties* density 0.2 (global), *dare* p = 0.5 then TIES, each at
lambda 1 and with lambda chosen on valid the same way (from {0.3, 0.5, 0.7, 1.0, 1.5, 2.0});
*mergerec_ties* is MergeRec's stand-alone TIES baseline (trim at density 0.2 and sum, no sign
election, weight 1); *adamerging* and *mergerec* learn coefficients on pseudo-users (500 steps, TIES
init; one row from the average instead) with the framework's defaults, which are not MergeRec as
published: the *mergerec* rows use MergeRec's loss (CE + 2.5 KL at T = 0.05) with a fitted KL score
scale per domain (``learn.fit_scale``; published: none), every learned row scores the candidates
with the history items' current vectors (``learn.item_vectors = "history"``; published: ``"fixed"``,
every candidate from the initial merge), and the last step is kept. Rows without *usage rows* merge
the text-code rows by the method (``--rows method``, the methods' own rows); the rows marked *usage
rows* merge them by catalogue usage (``fedmerge.merge.rows``, the framework's default), and their
MergeRec rows start from task arithmetic at the lambda chosen on valid with usage rows; in the
*scale on valid* rows the parties choose the size of the learned layer-wise coefficients, or of that
init's, on valid (``learn.valid_scales``: times 0.2 ... 1.0, or 1). *mergerec as published* is the
``[merge]`` table of ``configs/simulate-mergerec.toml`` (TIES init with method rows, layer-wise,
CE + 2.5 KL, no fitted scale, candidates fixed at the initial merge, dense teachers, 500 steps, the
last step kept) on these textseq models. *oracle* searches the coefficients of TIES's processed
vectors directly on the mean valid ndcg@10 of ``--oracle-users`` seeded valid users per domain
(coordinate ascent over {0, 0.25, ..., 2}: task-wise, two sweeps, then layer-wise, one sweep) and
reports test: the ceiling of any coefficients learned for this merge's vectors and backbone.
*Unseen*: merge all domains but one (mergerec loss, fitted KL scale, task-wise, usage rows, that
init) and test on the one left out, against theta_0 and every single fine-tuned model.

Runs are kept under ``--runs`` and reused when complete. Each finished base regime and seed is
also recorded as ``--tables``/``{base}-seed{N}.json`` (its cells, chosen lambdas, machine and
date); a recorded seed is read back instead of rerun when its settings match, so the table can
be built up one seed at a time on machines that do not keep ``--runs``. The written table
covers every seed recorded there, of both regimes.

    python benchmarks/merge_quality.py [--domains beauty,sports,toys,pantry] [--seeds 0,1,2]
        [--bases seeded,pretrained] [--pretrain steam,games] [--runs runs/merge]
        [--tables benchmarks/results/merge_quality] [--oracle-users 2000] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
from pathlib import Path

import numpy as np
import torch
from report import train_once

from fedmerge.config import load_config
from fedmerge.files import write_json
from fedmerge.merge.learn import LearnConfig, build_merged, parameter_groups
from fedmerge.merge.methods import prepare
from fedmerge.merge.run import _valid_judge, merge_run
from fedmerge.merge.server import MergeConfig
from fedmerge.merge.vectors import task_vector
from fedmerge.models import load_parts
from fedmerge.models.family import upgrade_stored
from fedmerge.protocol import FederationConfig
from fedmerge.runs.results import write_metrics
from fedmerge.train.checkpoint import load_checkpoint, read_state
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.run import evaluate_rows, pretrain_config

BASES = ("seeded", "pretrained")
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
TIES_LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
DARE = {"p": 0.5, "then": "ties", "density": 0.2}
# name -> (method, fixed params, lambdas): lambda chosen on the mean valid ndcg@10, method rows
TUNED = {
    "ties (lambda on valid)": ("ties", {}, TIES_LAMBDAS),
    "dare (lambda on valid)": ("dare", DARE, TIES_LAMBDAS),
}
SCALES = {"valid_scales": [0.2, 0.3, 0.4, 0.5, 0.7, 1.0]}
# name -> (method, params, learn mode, loss, rows, further LearnConfig settings); params None:
# lambda chosen on valid (same rows)
MERGES = {
    "average": ("average", {}, "none", "mergerec", "method", {}),
    "ties": ("ties", {}, "none", "mergerec", "method", {}),
    "dare": ("dare", DARE | {"lam": 1.0}, "none", "mergerec", "method", {}),
    "mergerec_ties": ("mergerec_ties", {}, "none", "mergerec", "method", {}),
    "adamerging": ("ties", {}, "task-wise", "adamerging", "method", {}),
    "mergerec task-wise": ("ties", {}, "task-wise", "mergerec", "method", {}),
    "mergerec layer-wise": ("ties", {}, "layer-wise", "mergerec", "method", {}),
    "mergerec task-wise, average init": ("average", {}, "task-wise", "mergerec", "method", {}),
    "ties, usage rows": ("ties", {}, "none", "mergerec", "usage", {}),
    "mergerec task-wise, usage rows, TA init": (
        "task_arithmetic",
        None,
        "task-wise",
        "mergerec",
        "usage",
        {},
    ),
    "mergerec layer-wise, usage rows, TA init": (
        "task_arithmetic",
        None,
        "layer-wise",
        "mergerec",
        "usage",
        {},
    ),
    "task arithmetic, usage rows, scale on valid": (
        "task_arithmetic",
        None,
        "none",
        "mergerec",
        "usage",
        SCALES,
    ),
    "mergerec layer-wise, usage rows, TA init, scale on valid": (
        "task_arithmetic",
        None,
        "layer-wise",
        "mergerec",
        "usage",
        SCALES,
    ),
}
MEASURED = [*TUNED, *MERGES, "mergerec as published", "oracle"]
TA_ROWS = {
    "method": "task_arithmetic (lambda on valid)",
    "usage": "task_arithmetic, usage rows (lambda on valid)",
}
UNSEEN = "unseen: mergerec of the others"
OPTIONAL = ["joint", *TA_ROWS.values(), *MEASURED, UNSEEN]
"""The rows ``--only`` can choose from (theta_0 and the fine-tuned rows are always measured)."""
"""Every row a seed record must hold (besides the fine-tuned, joint and task-arithmetic rows)."""
# record key (also in the run folder's name) -> the label the table shows, saying what the row ran
SHOWN = {
    "mergerec task-wise": "mergerec loss, fitted KL scale, task-wise",
    "mergerec layer-wise": "mergerec loss, fitted KL scale, layer-wise",
    "mergerec task-wise, average init": "mergerec loss, fitted KL scale, task-wise, average init",
    "mergerec task-wise, usage rows, TA init": (
        "mergerec loss, fitted KL scale, task-wise, usage rows, TA init"
    ),
    "mergerec layer-wise, usage rows, TA init": (
        "mergerec loss, fitted KL scale, layer-wise, usage rows, TA init"
    ),
    "mergerec layer-wise, usage rows, TA init, scale on valid": (
        "mergerec loss, fitted KL scale, layer-wise, usage rows, TA init, scale on valid"
    ),
    "unseen: mergerec of the others": (
        "unseen: merge of the others (mergerec loss, fitted KL scale, task-wise, usage rows, "
        "TA init)"
    ),
    "mergerec_ties": "mergerec_ties (MergeRec's stand-alone TIES baseline)",
    "mergerec as published": "mergerec as published (configs/simulate-mergerec.toml [merge])",
    "oracle": "oracle: coefficients searched on valid (TIES vectors, task-wise then layer-wise)",
}


def _rows(folder: Path) -> list[dict]:
    return (
        json.loads((folder / "metrics.json").read_text())
        if (folder / "metrics.json").exists()
        else []
    )


def _cells(rows: list[dict], label: str, split: str = "test") -> dict[str, tuple[float, float]]:
    return {
        r["domain"]: (r["recall@10"], r["ndcg@10"])
        for r in rows
        if r["model"] == label and r["split"] == split
    }


def _merge(
    folder: Path,
    base: Path,
    runs: Path,
    domains: list[str],
    method: str,
    params: dict,
    mode: str,
    loss: str,
    rows: str,
    steps: int,
    learn: dict | None = None,
) -> list[dict]:
    if not (folder / "metrics.json").exists():
        config = LearnConfig(mode=mode, loss=loss, steps=steps, **(learn or {}))
        merge = MergeConfig(method=method, params=params, learn=config, rows=rows)
        merge_run(base, [runs / d for d in domains], domains, merge, folder, quiet=True)
    return _rows(folder)


def _best_lambda(
    runs: Path,
    base: Path,
    domains: list[str],
    rows: str,
    steps: int,
    method: str = "task_arithmetic",
    fixed: dict | None = None,
    lambdas: tuple[float, ...] = LAMBDAS,
) -> tuple[float, list[dict]]:
    """`method`'s lambda with the best mean valid ndcg@10 (over `lambdas`), and its merge's rows."""
    prefix = "ta" if method == "task_arithmetic" else method
    grid = {
        lam: _merge(
            runs / f"merge-{prefix}{'-usage' if rows == 'usage' else ''}-{lam}",
            base,
            runs,
            domains,
            method,
            (fixed or {}) | {"lam": lam},
            "none",
            "mergerec",
            rows,
            steps,
        )
        for lam in lambdas
    }
    best = max(
        lambdas,
        key=lambda lam: np.mean([c[1] for c in _cells(grid[lam], method, "valid").values()]),
    )
    return best, grid[best]


ORACLE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def _oracle(
    folder: Path,
    base_path: Path,
    runs: Path,
    domains: list[str],
    config: ExperimentConfig,
    users: int | None,
) -> list[dict]:
    """Coefficients searched on the parties' valid ndcg@10 directly, tested.

    The ceiling of learned coefficients.

    From TIES (its processed vectors, rows by the method, w = 1), coordinate ascent over
    :data:`ORACLE_GRID`: task-wise (one w per domain, two sweeps), then layer-wise (one w per
    domain and layer group, one sweep from the task-wise optimum); every candidate is scored by
    the mean valid ndcg@10 over the domains, as the parties report it, on `users` seeded valid
    users of each domain (None: all of them). The rows are the final coefficients' valid and test
    metrics (every user); the search is kept in ``oracle.json``. Each finished coordinate is
    recorded in ``oracle.partial.json``, so a stopped search resumes there.
    """
    if (folder / "metrics.json").exists():
        return _rows(folder)
    states = [(m := load_checkpoint(runs / d)[0]).merge_space(m.exchanged()) for d in domains]
    base = {k: v for k, v in read_state(base_path).items() if k in states[0]}
    prepared = prepare("ties", [task_vector(base, s) for s in states])
    # a skeleton: the judge loads every candidate into it
    model = load_checkpoint(runs / domains[0])[0]
    parts = load_parts(domains, config.model, quiet=True)
    judge = _valid_judge(model, parts, config.train.model_copy(update={"valid_users": users}))
    progress = folder.parent / f"{folder.name}.partial.json"
    done = json.loads(progress.read_text()) if progress.exists() else {"log": [], "weights": []}
    keys = list(prepared.vectors[0])
    group_of, groups = parameter_groups(model, keys, "layer-wise")
    weights = torch.ones(len(domains), len(groups))
    log: list[dict] = []

    def ascend(coordinates: list[tuple[int, slice | int]]) -> None:
        for k, g in coordinates:
            if len(log) < len(done["log"]):  # searched before the search was stopped
                log.append(done["log"][len(log)])
                weights.copy_(torch.tensor(done["weights"][len(log) - 1]))
                continue
            tried = []
            for value in ORACLE_GRID:
                candidate = weights.clone()
                candidate[k, g] = value
                tried.append(candidate)
            scores = judge([build_merged(base, prepared.vectors, w, group_of) for w in tried])
            best = max(range(len(scores)), key=lambda i: (scores[i], -abs(ORACLE_GRID[i] - 1.0)))
            weights.copy_(tried[best])
            log.append(
                {
                    "domain": domains[k],
                    "group": "all" if isinstance(g, slice) else groups[g],
                    "scores": dict(zip(map(str, ORACLE_GRID), scores, strict=True)),
                    "kept": ORACLE_GRID[best],
                }
            )
            done["log"].append(log[-1])
            done["weights"].append(weights.tolist())
            folder.parent.mkdir(parents=True, exist_ok=True)
            write_json(progress, done)

    task = [(k, slice(None)) for k in range(len(domains))]
    with torch.no_grad():
        ascend(task + task)
        ascend([(k, g) for k in range(len(domains)) for g in range(len(groups))])
        merged = build_merged(base, prepared.vectors, weights, group_of)
    model.load_merged(merged)
    rows = evaluate_rows(model, parts, "oracle", config.train)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(
        folder / "oracle.json",
        {"groups": groups, "weights": weights.tolist(), "log": log, "valid users": users},
    )
    write_metrics(rows, folder)
    progress.unlink()
    return rows


def _cross(folder: Path, names: list[str], config: ExperimentConfig, label: str) -> list[dict]:
    """Rows of the checkpoint in `folder` on every domain of `names` (cached as cross.json)."""
    cache = folder / "cross.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, _, _ = load_checkpoint(folder)
    rows = evaluate_rows(model, load_parts(names, config.model, quiet=True), label)
    write_json(cache, rows)
    return rows


def run_seed(base_kind: str, seed: int, args: argparse.Namespace) -> tuple[dict, dict[str, float]]:
    """All table cells of one base regime and seed, and task arithmetic's lambdas.

    The cells are {row label: {domain: (recall@10, ndcg@10)}}; a lambda is chosen on valid for each
    way of merging rows.
    """
    config = load_config("textseq", [*args.overrides, f"train.seed={seed}"], ExperimentConfig)
    runs = args.runs / base_kind / f"seed{seed}"
    init = None
    if base_kind == "pretrained":
        init = args.runs / f"pretrained-seed{seed}"
        train_once(
            args.pretrain.split(","),
            pretrain_config("textseq", [*args.overrides, f"train.seed={seed}"]),
            init,
            None,
            label="pretrained",
        )
    for name in args.domains:
        train_once([name], config, runs / name, init)
    base = runs / args.domains[0] / "base.safetensors"

    def wanted(label: str) -> bool:
        return args.only is None or label in args.only

    table: dict[str, dict[str, tuple[float, float]]] = {"theta_0": {}, "fine-tuned (own)": {}}
    for name in args.domains:
        own = _rows(runs / name)
        table["theta_0"] |= _cells(own, "base")
        table["fine-tuned (own)"] |= _cells(own, "textseq")
        for other, cell in _cells(_cross(runs / name, args.domains, config, name), name).items():
            table.setdefault(f"fine-tuned on {name}", {})[other] = cell
    if wanted("joint"):
        train_once(args.domains, config, runs / "joint", init)
        table["joint"] = _cells(_rows(runs / "joint"), "joint")
    lam: dict[str, float] = {}

    def ta_lambda(rows: str) -> float:
        if rows not in lam:
            lam[rows], chosen = _best_lambda(runs, base, args.domains, rows, args.steps)
            table[TA_ROWS[rows]] = _cells(chosen, "task_arithmetic")
        return lam[rows]

    for rows, label in TA_ROWS.items():
        if wanted(label):
            ta_lambda(rows)
    for label, (method, fixed, lambdas) in TUNED.items():
        if wanted(label):
            lam[label], chosen = _best_lambda(
                runs, base, args.domains, "method", args.steps, method, fixed, lambdas
            )
            table[label] = _cells(chosen, method)
    published = runs / "merge-mergerec-as-published"
    if wanted("mergerec as published"):
        if not (published / "metrics.json").exists():
            merge_run(
                base,
                [runs / d for d in args.domains],
                args.domains,
                load_config("simulate-mergerec", [], FederationConfig).merge,
                published,
                quiet=True,
            )
        table["mergerec as published"] = _cells(_rows(published), "ties+layer-wise:mergerec")
    if wanted("oracle"):
        table["oracle"] = _cells(
            _oracle(runs / "oracle", base, runs, args.domains, config, args.oracle_users),
            "oracle",
        )
    for label, (method, params, mode, loss, rows, learn) in MERGES.items():
        if not wanted(label):
            continue
        folder = runs / f"merge-{re.sub('[^a-z0-9]+', '-', label)}"
        merged = _merge(
            folder,
            base,
            runs,
            args.domains,
            method,
            {"lam": ta_lambda(rows)} if params is None else params,
            mode,
            loss,
            rows,
            args.steps,
            learn,
        )
        table[label] = {
            r["domain"]: (r["recall@10"], r["ndcg@10"]) for r in merged if r["split"] == "test"
        }
    if wanted(UNSEEN):
        table[UNSEEN] = {}
        for unseen in args.domains:
            seen = [d for d in args.domains if d != unseen]
            folder = runs / f"unseen-{unseen}"
            _merge(
                folder,
                base,
                runs,
                seen,
                "task_arithmetic",
                {"lam": ta_lambda("usage")},
                "task-wise",
                "mergerec",
                "usage",
                args.steps,
            )
            table[UNSEEN] |= _cells(_cross(folder, [unseen], config, "merged"), "merged")
    return table, lam


def _stops(base_kind: str, seed: int, args: argparse.Namespace) -> dict[str, str]:
    """Why each training of the seed stopped ({run: reason}), read from its checkpoint."""
    runs = args.runs / base_kind / f"seed{seed}"
    folders = {name: runs / name for name in [*args.domains, "joint"]}
    if base_kind == "pretrained":
        folders["pretrained"] = args.runs / f"pretrained-seed{seed}"
    return {
        name: json.loads((folder / "config.json").read_text())["stopped"]
        for name, folder in folders.items()
        if (folder / "config.json").exists()
    }


def _preset(config: dict) -> dict:
    """A resolved preset as recorded, without the seed.

    Keys added to the config since a record was written take their defaults (which keep the old
    behaviour), so the record still matches, and a record written before each family had its own
    config is read in today's layout.
    """
    dump = ExperimentConfig.model_validate(upgrade_stored(config)).model_dump(mode="json")
    del dump["train"]["seed"]
    return dump


def seed_record(base_kind: str, seed: int, args: argparse.Namespace, report: bool = False) -> dict:
    """One base regime and seed.

    Read from ``args.tables`` when recorded with the same settings (benchmark arguments and the
    resolved preset apart from the seed; the ``--set`` overrides are recorded but only their result
    counts, so a recorded seed stays readable after a preset default changes, given ``--set`` back
    to the old value), else measured with :func:`run_seed` and recorded there (atomically). A record
    that lacks rows of :data:`MEASURED` is measured again (reusing the runs), unless `report`: then
    it is read back as it is.
    """
    path = args.tables / f"{base_kind}-seed{seed}.json"
    settings = {
        "domains": args.domains,
        "pretrain": args.pretrain,
        "steps": args.steps,
        "overrides": args.overrides,
        "config": _preset(
            load_config("textseq", args.overrides, ExperimentConfig).model_dump(mode="json")
        ),
    }
    if base_kind == "pretrained":
        settings["pretrain config"] = _preset(
            pretrain_config("textseq", args.overrides).model_dump(mode="json")
        )
    if path.exists():
        record = json.loads(path.read_text())
        recorded = record["settings"] | {"config": _preset(record["settings"].get("config", {}))}
        # records from before pretrain had its own config pretrained with the same one
        if base_kind == "pretrained":
            recorded["pretrain config"] = _preset(
                record["settings"].get("pretrain config", recorded["config"])
            )
        differing = [
            key
            for key, value in settings.items()
            if key != "overrides" and recorded.get(key) != value
        ]
        if differing:
            raise SystemExit(
                f"{path} was measured with another {', '.join(differing)}; "
                "give another --tables folder or remove that file to rerun the seed"
            )
        missing = [label for label in args.only or MEASURED if label not in record["table"]]
        if report or not missing:
            return record
        print(
            f"{path} has no row {', '.join(missing)}: measuring the seed (complete runs under "
            "--runs are reused)"
        )
    table, lambdas = run_seed(base_kind, seed, args)
    record = {
        "base": base_kind,
        "seed": seed,
        "settings": settings,
        "lambdas": lambdas,
        "table": table,
        "trainings": _stops(base_kind, seed, args),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "date": datetime.date.today().isoformat(),
    }
    args.tables.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def _summary(tables: list[dict], domains: list[str]) -> list[dict]:
    """Mean and std over seeds of every cell, plus the average over domains."""
    out = []
    for label in dict.fromkeys(label for t in tables for label in t):
        # rows added since are missing from older records
        having = [t[label] for t in tables if label in t]
        shown = SHOWN.get(label, label)
        name = (
            shown
            if len(having) == len(tables)
            else f"{shown} ({len(having)} of {len(tables)} seeds)"
        )
        record: dict[str, object] = {"model": name}
        for metric, index in (("recall@10", 0), ("ndcg@10", 1)):
            per_seed = [[cells[d][index] for d in domains if d in cells] for cells in having]
            for d in domains:
                values = [cells[d][index] for cells in having if d in cells]
                if values:
                    record[f"{d} {metric}"] = (float(np.mean(values)), float(np.std(values)))
            if all(len(s) == len(domains) for s in per_seed):
                averages = [float(np.mean(s)) for s in per_seed]
                record[f"average {metric}"] = (float(np.mean(averages)), float(np.std(averages)))
        out.append(record)
    return out


def _markdown(records: list[dict], domains: list[str]) -> str:
    columns = [f"{d} {m}" for d in [*domains, "average"] for m in ("recall@10", "ndcg@10")]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in records:
        cells = [f"{r[c][0]:.4f} ± {r[c][1]:.4f}" if c in r else "–" for c in columns]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, (regime, records) in zip(axes[0], results.items(), strict=True):
        shown = [
            r
            for r in records
            if "average recall@10" in r and not r["model"].startswith(("fine-tuned on", "unseen"))
        ]
        ax.barh(
            [r["model"] for r in shown],
            [r["average recall@10"][0] for r in shown],
            xerr=[r["average recall@10"][1] for r in shown],
        )
        ax.set_title(f"{regime} base")
        ax.set_xlabel("average test recall@10")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _measured(record: dict) -> str:
    """When and where a seed was measured, its lambdas chosen on valid, any training cut short."""
    lambdas = {"method": "task arithmetic", "usage": "task arithmetic, usage rows"}
    chosen = ", ".join(
        f"{lambdas.get(key, key.split()[0])} lambda {value}"
        for key, value in record["lambdas"].items()
    )
    limited = [name for name, why in record.get("trainings", {}).items() if "time limit" in why]
    cut = f", stopped by the time limit: {', '.join(limited)}" if limited else ""
    return f"seed {record['seed']}: {record['date']}, {record['machine']}, {chosen}{cut}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--domains", type=lambda s: s.split(","), default=["beauty", "sports", "toys", "pantry"]
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--bases", type=lambda s: s.split(","), default=list(BASES))
    parser.add_argument("--pretrain", default="steam,games")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument(
        "--oracle-users",
        type=lambda s: None if s == "all" else int(s),
        default=2000,
        help="seeded valid users per domain the oracle's search reads ('all': every one)",
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/merge"))
    parser.add_argument(
        "--tables", type=Path, default=Path(__file__).parent / "results" / "merge_quality"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--report",
        action="store_true",
        help="measure nothing; only write the table (--seeds and --bases are ignored)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--only",
        type=lambda s: s.split(";"),
        default=None,
        help="measure only these rows, separated by ';' (theta_0 and fine-tuned always): "
        + "; ".join(OPTIONAL),
    )
    args = parser.parse_args()
    unknown = [label for label in args.only or [] if label not in OPTIONAL]
    if unknown:
        parser.error(f"--only: no row {', '.join(unknown)}; choose from: {'; '.join(OPTIONAL)}")
    if not args.report:
        for kind in args.bases:
            for seed in args.seeds:
                seed_record(kind, seed, args)
    recorded = {
        kind: sorted(int(p.stem.split("-seed")[1]) for p in args.tables.glob(f"{kind}-seed*.json"))
        for kind in BASES
    }
    seeds = {
        kind: [seed_record(kind, seed, args, report=True) for seed in recorded[kind]]
        for kind in BASES
        if recorded[kind]
    }
    results = {
        kind: _summary([r["table"] for r in records], args.domains)
        for kind, records in seeds.items()
    }
    protocol = (__doc__ or "").split("\n\n")[1]
    text = (
        f"# Merging quality\n\n{protocol}\n\nSettings: "
        f"{' '.join(args.overrides) or 'preset defaults'}.\n"
    )
    for kind, records in results.items():
        measured = "; ".join(_measured(r) for r in seeds[kind])
        text += (
            f"\n## {kind} base\n\nSeeds measured: "
            f"{measured}.\n\n{_markdown(records, args.domains)}\n"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_quality.md").write_text(text)
    with open(args.out / "merge_quality.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["base", "model", "column", "mean", "std"])
        for kind, records in results.items():
            for r in records:
                writer.writerows([kind, r["model"], k, *v] for k, v in r.items() if k != "model")
    _plot(results, args.out / "merge_quality.png")
    print(text)


if __name__ == "__main__":
    main()
