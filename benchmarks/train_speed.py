"""Training throughput of fedmerge's loop against a bare PyTorch loop on the same model and data.

Protocol: one domain (default beauty, MiniLM features, the ``textseq`` preset), one epoch each.
fedmerge's side is ``fedmerge.train.loop.fit`` (length-bucketed batches built on the fly,
warm-up schedule, NaN check, progress bookkeeping; its sequences/second count training time
only, not the validation pass). The bare side is a plain loop of forward, backward and AdamW
step over the same batches, materialised beforehand, from a copy of the same initial weights.
Both run in the same process with the same threads; each side is run twice and the faster
epoch counts.

    python benchmarks/train_speed.py [--domain beauty] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from report import write_row

from fedmerge.config import load_config
from fedmerge.models import build_model, load_parts
from fedmerge.train.batches import length_batches, training_sequences
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.loop import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="beauty")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    config = load_config("textseq", ["train.epochs=1", *args.overrides], ExperimentConfig)
    part = load_parts([args.domain], config.model, quiet=True)[0]
    base = build_model(config.model, part.features.shape[1], config.train.seed)
    sequences = training_sequences(part.domain, config.model.max_len)
    batches = list(
        length_batches(
            sequences, config.train.batch_size, config.model.max_len, np.random.default_rng(0)
        )
    )

    def bare() -> float:
        model = copy.deepcopy(base).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        start = time.perf_counter()
        for inputs, targets in batches:
            # sampled softmax: the model config's negatives
            loss = model.loss(part.features, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return len(sequences) / (time.perf_counter() - start)

    def ours() -> float:
        return fit(copy.deepcopy(base), [part], config.train, quiet=True).sequences_per_second

    bare_rate, our_rate = max(bare(), bare()), max(ours(), ours())
    row = {
        "domain": args.domain,
        "sequences": len(sequences),
        "batch_size": config.train.batch_size,
        "dim": config.model.dim,
        "layers": config.model.layers,
        "threads": torch.get_num_threads(),
        "bare_seq_per_s": round(bare_rate, 1),
        "fedmerge_seq_per_s": round(our_rate, 1),
        "ratio": round(our_rate / bare_rate, 3),
    }
    print(
        write_row(
            args.out, "train_speed", "Training throughput", (__doc__ or "").split("\n\n")[1], row
        )
    )


if __name__ == "__main__":
    main()
