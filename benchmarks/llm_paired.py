"""Does a domain's LoRA adapter rank its own domain better than the zero-shot base? User by user.

Protocol: the adapter trained by ``benchmarks/llm_quality.py`` (its ``--runs`` folder) and the
zero-shot base (theta_0) rank the same candidate lists (the true item + the adapter's
``train.evaluation.candidates`` uniform negatives, seeded) for the same seeded sample of
``--users`` users of the domain's ``--split``; each user's ndcg@10 and hit@10 under both models,
their mean difference (adapter - base) with its paired standard error and a normal 95% interval,
and how many users each model ranks strictly better.

    python benchmarks/llm_paired.py --runs runs/llm-quality --domain beauty [--users 400] \
        [--split test] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from fedmerge.evaluate import domain_ranks, model_scorer, user_gains
from fedmerge.models import build_model, load_parts
from fedmerge.train.checkpoint import load_checkpoint


def paired(base: torch.Tensor, other: torch.Tensor) -> tuple[float, float, int, int]:
    """The paired difference of two models' per-user values.

    Returns the mean of ``other - base``, its standard error, and how many users `other` and
    `base` each score strictly higher.
    """
    diff = (other - base).double()
    se = float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
    return float(diff.mean()), se, int((diff > 0).sum()), int((diff < 0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/llm-quality"))
    parser.add_argument("--domain", default="beauty")
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    adapter, config, meta = load_checkpoint(args.runs / args.domain)
    protocol = config.train.evaluation.model_copy(update={"users": args.users})
    part = load_parts([args.domain], config.model, quiet=True)[0]
    base = build_model(config.model, meta["text_dim"], config.train.seed)
    start = time.perf_counter()
    ranks = [
        domain_ranks(
            model_scorer(model, part.features),
            part.domain,
            args.split,
            config.train.eval_batch_size,
            protocol=protocol,
        )
        for model in (base, adapter)
    ]
    seconds = time.perf_counter() - start
    lines = [
        f"# {args.domain}: its adapter against the zero-shot base, user by user\n",
        (__doc__ or "").split("\n\n")[1] + "\n",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; "
        f"{len(ranks[0])} {args.split} users of {args.domain}, each among "
        f"{protocol.name()}; adapter kept epoch {meta['best_epoch']} "
        f"({meta['stopped']}); {seconds:.0f} s to rank both.\n",
        "| metric | zero-shot | adapter | adapter - zero-shot (paired SE) | 95% interval "
        "| users adapter better / worse |",
        "|---|---|---|---|---|---|",
    ]
    ours, theirs = user_gains(ranks[1], 10), user_gains(ranks[0], 10)
    for metric, label in (("ndcg@10", "ndcg@10"), ("recall@10", "hit@10")):  # one target: hit
        mean, se, better, worse = paired(theirs[metric], ours[metric])
        lines.append(
            f"| {label} | {float(theirs[metric].mean()):.4f} | {float(ours[metric].mean()):.4f} "
            f"| {mean:+.4f} ({se:.4f}) | [{mean - 1.96 * se:+.4f}, {mean + 1.96 * se:+.4f}] "
            f"| {better} / {worse} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"llm_paired_{args.domain}_{args.split}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
