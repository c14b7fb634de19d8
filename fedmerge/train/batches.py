"""Training sequences and length-bucketed batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedmerge.data.domain import DomainData
from fedmerge.data.sequences import last_positions, pad_right


def training_sequences(domain: DomainData, max_len: int) -> list[np.ndarray]:
    """Each user's training sequence (its last ``max_len + 1`` items), users with >= 2 items."""
    seqs = (domain.train_sequence(u)[-(max_len + 1) :] for u in range(domain.n_users))
    return [s for s in seqs if len(s) >= 2]


def length_batches(
    sequences: Sequence[np.ndarray], batch_size: int, max_len: int, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of (inputs, targets), each batch of sequences of similar length.

    Users are shuffled, sorted by length within windows of 50 batches, cut into batches, and
    the batches shuffled: little padding, still a random order.
    """
    order = rng.permutation(len(sequences))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(sequences[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    for index in rng.permutation(len(batches)):
        seqs = [sequences[i] for i in batches[index]]
        yield pad_right([s[:-1] for s in seqs], max_len), pad_right([s[1:] for s in seqs], max_len)


def last_targets_only(targets: torch.Tensor) -> torch.Tensor:
    """`targets` (B, L) with every position but each row's last real one set to -1 (padding)."""
    out = torch.full_like(targets, -1)
    rows, last = torch.arange(len(targets)), last_positions(targets)
    out[rows, last] = targets[rows, last]
    return out
