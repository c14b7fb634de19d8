"""Unseen domain, text weight chosen locally: theta_0, each single model, the merge of the others.

Protocol: for one seed's runs of ``merge_quality.py`` (``--runs``/``{base}``/``seed{N}``), each
domain in turn is the unseen one. theta_0, every model fine-tuned on another domain, and the
unseen merge (of the other domains, ``unseen-{domain}``: mergerec loss with a fitted KL scale,
task-wise, usage rows, task-arithmetic init) are scored on the
unseen domain's test split after the unseen party sets each model's text weight on its own
valid users (``train.valid_users`` of the runs' config, best ndcg@10 over ``--weights``), as
a party of the federation does with ``local_calibration``. Full ranking over the domain's items,
seen items not excluded; recall@10 and ndcg@10.

    python benchmarks/unseen_text_weight.py [--runs runs/merge] [--base seeded] [--seed 0]
        [--weights 0,0.1,0.2,0.3,0.5,0.7,1,1.5,2,3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merge_quality import BASES

from fedmerge.evaluate import model_scorer
from fedmerge.evaluate.ranking import evaluate_domain
from fedmerge.files import write_json
from fedmerge.models import load_parts
from fedmerge.train.checkpoint import load_checkpoint, load_weights
from fedmerge.train.loop import calibration_metrics, choose_calibration


def unseen_rows(runs: Path, domains: list[str], weights: list[float]) -> list[dict]:
    """One row per (unseen domain, model).

    The chosen text weight and its test recall@10 / ndcg@10.
    """
    rows = []
    for unseen in domains:
        others = [d for d in domains if d != unseen]
        base, config, _ = load_checkpoint(runs / others[0])
        load_weights(base, runs / others[0] / "base.safetensors")
        models = {"theta_0": base} | {
            f"fine-tuned on {d}": load_checkpoint(runs / d)[0] for d in others
        }
        models["merge of the others"] = load_checkpoint(runs / f"unseen-{unseen}")[0]
        train = config.train
        part = load_parts([unseen], config.model, quiet=True)[0]
        for label, model in models.items():
            arrived = float(model.text_weight)
            # the weights tried
            model.config = model.config.model_copy(update={"text_weights": weights})
            scores = choose_calibration(model, calibration_metrics(model, [part], train))
            test = evaluate_domain(
                model_scorer(model, part.features), part.domain, "test", train.eval_batch_size
            )
            rows.append(
                {
                    "unseen": unseen,
                    "model": label,
                    "arrived text weight": arrived,
                    "chosen text weight": float(model.text_weight),
                    "valid ndcg@10 by weight": scores,
                    "recall@10": float(test["recall@10"]),
                    "ndcg@10": float(test["ndcg@10"]),
                }
            )
    return rows


def _markdown(rows: list[dict], domains: list[str]) -> str:
    cell = {(r["unseen"], r["model"]): r for r in rows}
    labels = ["theta_0", *(f"fine-tuned on {d}" for d in domains), "merge of the others"]
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for label in labels:
        cells = [
            f"{cell[d, label]['recall@10']:.4f} (w {cell[d, label]['chosen text weight']:g})"
            if (d, label) in cell
            else "–"
            for d in domains
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/merge"))
    parser.add_argument("--base", default="seeded", choices=BASES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--domains", type=lambda s: s.split(","), default=["beauty", "sports", "toys", "pantry"]
    )
    parser.add_argument(
        "--weights",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0],
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "unseen_text_weight"
    )
    args = parser.parse_args()
    runs = args.runs / args.base / f"seed{args.seed}"
    missing = [
        p
        for p in [*(runs / d for d in args.domains), *(runs / f"unseen-{d}" for d in args.domains)]
        if not (p / "metrics.json").exists()
    ]
    if missing:
        raise SystemExit(
            f"{missing[0]} is not a finished run: run `python benchmarks/merge_quality.py --seeds "
            f"{args.seed} --bases {args.base} --runs {args.runs}` first"
        )
    rows = unseen_rows(runs, args.domains, args.weights)
    name = f"{args.base}-seed{args.seed}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{name}.json", {"weights": args.weights, "rows": rows})
    text = (
        f"# Unseen domain, text weight chosen on its valid users ({args.base} base, seed "
        f"{args.seed})\n\n{__doc__.split(chr(10) * 2)[1]}\n\nTest recall@10 (chosen text weight) "
        f"per unseen domain:\n\n{_markdown(rows, args.domains)}\n"
    )
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
