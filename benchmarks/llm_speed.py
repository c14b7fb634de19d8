"""Speed of the ``llm-lora`` family: LoRA training and candidate scoring on a real domain.

Protocol: one domain (default beauty), a seeded sample of ``--users`` users, the ``llm-lora``
preset (SmolLM2-135M-Instruct de-quantised from Q4_1, LoRA r = 8 on q_proj and v_proj, prompts of
at most 256 tokens). *Training*: fedmerge's loop (``fedmerge.train.loop.fit``, one epoch of the
sample, its own validation pass on 8 users not counted) against a bare transformers + peft loop
(the same prompts and answers, the same left-padded batches, AdamW over the LoRA factors) from a
copy of the same initial adapter, in the same process; tokens per second count every real
(unpadded) token of the batches; each side runs twice and the faster counts. *Scoring*: the
sample's test users, each ranking its true item among ``--candidates`` uniform negatives, with the
prompt's key / value cache shared by the candidates (fedmerge's scorer) against scoring each
(prompt, candidate) pair on its own; seconds per user, and the largest difference between the two
scores (they are the same numbers).

    python benchmarks/llm_speed.py [--domain beauty] [--users 64] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import numpy as np
import torch
from report import write_row
from torch.nn import functional as F

from fedmerge.config import load_config
from fedmerge.data.domain import user_subset
from fedmerge.evaluate.protocol import EvalProtocol, candidate_lists
from fedmerge.evaluate.scoring import _histories
from fedmerge.models import Part, build_model, load_parts
from fedmerge.train.batches import length_batches, training_sequences
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.loop import fit


def _bare_epoch(model: torch.nn.Module, table: torch.Tensor, batches: list, lr: float) -> float:
    """One epoch of plain forward / backward / AdamW over the LoRA factors; seconds."""
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    start = time.perf_counter()
    for ids, mask, answers in batches:
        logits = model.lm(input_ids=ids, attention_mask=mask, logits_to_keep=answers.shape[1] + 1)
        loss = F.cross_entropy(logits.logits[:, :-1].flatten(0, 1), answers.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="beauty")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=19)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    config = load_config(
        "llm-lora", ["train.epochs=1", "train.valid_users=8", *args.overrides], ExperimentConfig
    )
    whole = load_parts([args.domain], config.model, quiet=True)[0]
    chosen = np.sort(
        np.random.default_rng(0).choice(whole.domain.n_users, args.users, replace=False)
    )
    part = Part(user_subset(whole.domain, chosen), whole.features)
    table = part.features
    base = build_model(config.model, table.shape[1], config.train.seed)
    sequences = training_sequences(part.domain, config.model.max_len)
    raw = list(
        length_batches(
            sequences, config.train.batch_size, config.model.max_len, np.random.default_rng(0)
        )
    )
    batches = [base.batch_ids(table, inputs, targets) for inputs, targets in raw]
    tokens = sum(int(mask.sum()) for _, mask, _ in batches)

    def ours() -> float:
        model = copy.deepcopy(base)
        result = fit(model, [part], config.train, quiet=True)
        return result.train_seconds

    ours_s = min(ours() for _ in range(2))
    bare_s = min(
        _bare_epoch(copy.deepcopy(base), table, batches, config.train.lr) for _ in range(2)
    )

    model = copy.deepcopy(base).eval()
    protocol = EvalProtocol(candidates=args.candidates)
    lists = torch.from_numpy(candidate_lists(part.domain, "test", protocol))
    users = np.flatnonzero(part.domain.targets("test") >= 0)
    histories = _histories(model, torch.device("cpu"), part.domain, users, "test")
    with torch.inference_mode():
        start = time.perf_counter()
        shared = model.candidate_scorer(table)(histories, lists)
        shared_s = (time.perf_counter() - start) / len(users)
        start = time.perf_counter()
        alone = torch.empty_like(shared)
        for row in range(len(users)):
            prompt = model._prompt(table, histories[row])
            for column, item in enumerate(lists[row].tolist()):
                answer = model._answer(table, item)
                logp = F.log_softmax(
                    model.lm(input_ids=torch.tensor([prompt + answer])).logits[0], -1
                )
                alone[row, column] = torch.stack(
                    [logp[len(prompt) + j - 1, t] for j, t in enumerate(answer)]
                ).mean()
        alone_s = (time.perf_counter() - start) / len(users)
    row = {
        "domain": args.domain,
        "users": args.users,
        "train steps": len(batches),
        "tokens": tokens,
        "fedmerge tokens/s": round(tokens / ours_s, 1),
        "bare tokens/s": round(tokens / bare_s, 1),
        "ratio": round(bare_s / ours_s, 3),
        "s per train step (fedmerge)": round(ours_s / len(batches), 2),
        "s per user, shared cache": round(shared_s, 3),
        "s per user, each pair alone": round(alone_s, 3),
        "scoring speed-up": round(alone_s / shared_s, 2),
        "max score difference": float((shared - alone).abs().max()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "settings": " ".join(args.overrides) or "preset",
    }
    protocol_text = (__doc__ or "").split("\n\n")[1]
    print(write_row(args.out, "llm_speed", "llm-lora speed", protocol_text, row))


if __name__ == "__main__":
    main()
