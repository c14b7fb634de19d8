"""Quality of the ``llm-lora`` family on two real domains: zero-shot, adapters, merges.

Protocol: the ``simulate-llm`` recipe, offline: each domain's LoRA adapter on SmolLM2-135M-Instruct
(de-quantised from Q4_1) is trained with ``fedmerge train`` (the preset's training settings, with
``--epochs`` epochs of ``train.batches_per_epoch`` seeded batches and early stopping on
``train.valid_users`` seeded valid users); then, on the test split of every domain: popularity,
the zero-shot base (theta_0), each adapter (on its own and on the other domain), the training-free
merges of the adapters' Delta W (``--methods``, each at its default parameters, nothing tuned on
valid) and the preset's learned merge (TIES, layer-wise coefficients, MergeRec's loss on
candidate lists). Every model ranks the same lists (the true item + 19 uniform negatives, seeded)
for the same seeded sample of ``--users`` test users per domain; hit@10 (recall@10 with one target)
and ndcg@10. Trainings, merges and each model's rows are kept under ``--runs`` and reused, so an
interrupted run resumes.

    python benchmarks/llm_quality.py [--domains beauty,toys] [--users 100] [--epochs 3] \
        [--methods average,task_arithmetic,ties,dare] [--runs runs/llm-quality] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedmerge.config import load_config
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.evaluate.popularity import popularity_scorer
from fedmerge.evaluate.scoring import Scorer
from fedmerge.files import write_json
from fedmerge.merge.learn import LearnConfig
from fedmerge.merge.server import Member, MergeConfig, server_merge
from fedmerge.merge.vectors import task_vector
from fedmerge.models import Part, Recommender, build_model, load_parts
from fedmerge.protocol import FederationConfig
from fedmerge.runs.results import metric_row
from fedmerge.train.checkpoint import load_checkpoint
from fedmerge.train.config import ExperimentConfig, TrainConfig
from fedmerge.train.run import train_run


def _test_rows(
    scorer_of: dict[str, Scorer], parts: list[Part], label: str, config: TrainConfig
) -> list[dict]:
    """Test rows of one model (a scorer per domain) on every part."""
    return [
        metric_row(
            label,
            part.domain.name,
            "test",
            evaluate_domain(
                scorer_of[part.domain.name],
                part.domain,
                "test",
                config.eval_batch_size,
                protocol=config.evaluation,
            ),
            config.evaluation.name(),
        )
        for part in parts
    ]


def _kept(path: Path, measure: Callable[[], list[dict]]) -> tuple[list[dict], float]:
    """The rows in `path` (with their seconds), else measured by `measure` and written there."""
    if path.exists():
        record = json.loads(path.read_text())
        return record["rows"], record["seconds"]
    start = time.perf_counter()
    rows = measure()
    seconds = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"rows": rows, "seconds": seconds})
    return rows, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="beauty,toys")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", default="average,task_arithmetic,ties,dare")
    parser.add_argument("--runs", type=Path, default=Path("runs/llm-quality"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    domains = args.domains.split(",")
    preset = load_config(
        "simulate-llm",
        [
            f"train.epochs={args.epochs}",
            f"train.evaluation.users={args.users}",
            "train.max_minutes=null",
            *args.overrides,
        ],
        FederationConfig,
    )
    config = ExperimentConfig(model=preset.model, train=preset.train)
    args.runs.mkdir(parents=True, exist_ok=True)
    for name in domains:
        if not (args.runs / name / "model.safetensors").exists():
            train_run([name], config, args.runs / name)
    parts = load_parts(domains, config.model, quiet=True)
    width = parts[0].features.shape[1]
    results: dict[str, tuple[list[dict], float]] = {}

    def kept(label: str, measure: Callable[[], list[dict]]) -> None:
        results[label] = _kept(args.runs / "rows" / f"{label}.json", measure)

    def model_rows(label: str, model: Recommender) -> list[dict]:
        scorers = {p.domain.name: model_scorer(model, p.features) for p in parts}
        return _test_rows(scorers, parts, label, config.train)

    popular = {p.domain.name: popularity_scorer for p in parts}
    kept("popularity", lambda: _test_rows(popular, parts, "popularity", config.train))
    skeleton = build_model(config.model, width, config.train.seed)
    kept("theta_0", lambda: model_rows("theta_0", skeleton))
    base = skeleton.merge_space(skeleton.exchanged())
    members = []
    for part in parts:
        name = part.domain.name
        adapter = load_checkpoint(args.runs / name)[0]
        kept(f"adapter {name}", lambda: model_rows(f"adapter {name}", adapter))  # noqa: B023
        members.append(
            Member(name, task_vector(base, adapter.merge_space(adapter.exchanged())), part.features)
        )
    merges = {
        method: MergeConfig(method=method, rows="method", learn=LearnConfig(mode="none"))
        for method in args.methods.split(",")
    }
    merges["learned (" + preset.merge.method + ", " + preset.merge.learn.mode + ")"] = preset.merge

    def merged_rows(label: str, merge: MergeConfig) -> list[dict]:
        outcome = server_merge(base, members, config.model, config.train.seed, merge, quiet=False)
        merged = build_model(config.model, width, config.train.seed)
        merged.load_merged(outcome.merged)
        return model_rows(label, merged)

    for label, merge in merges.items():
        kept(label, lambda: merged_rows(label, merge))  # noqa: B023

    lines = [
        "| model | " + " | ".join(f"{d} hit@10 | {d} ndcg@10" for d in domains) + " | seconds |",
        "|---|" + "---|---|" * len(domains) + "---|",
    ]
    for label, (rows, seconds) in results.items():
        cells = {r["domain"]: r for r in rows}
        lines.append(
            f"| {label} | "
            + " | ".join(
                f"{cells[d]['recall@10']:.4f} | {cells[d]['ndcg@10']:.4f}" for d in domains
            )
            + f" | {seconds} |"
        )
    for name in domains:
        meta = json.loads((args.runs / name / "config.json").read_text())
        curve = ", ".join(f"{h['valid_ndcg@10']:.4f}" for h in meta["history"])
        lines.append(
            f"\nAdapter {name}: kept epoch {meta['best_epoch']} ({meta['stopped']}; "
            f"{meta['train_seconds']:.0f} s of training); valid ndcg@10 by epoch from 0: {curve}."
        )
    table = "\n".join(lines)
    protocol = (__doc__ or "").split("\n\n")[1]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    settings = f"--users {args.users} --epochs {args.epochs} " + " ".join(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm_quality.md").write_text(
        f"# llm-lora quality\n\n{protocol}\n\nMachine: {machine}; settings: {settings}; "
        f"ranking: {config.train.evaluation.name()}.\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
