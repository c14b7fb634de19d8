"""Right-padded history tensors (pad = -1).

Padding a batch of sequences and reading each row's last item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_right(sequences: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Right-padded (B, L) int64 tensor of each sequence's last `max_len` items, pad = -1."""
    width = max(1, min(max_len, max((len(s) for s in sequences), default=1)))
    out = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        out[row, : len(tail)] = torch.as_tensor(tail, dtype=torch.long)
    return out


def last_positions(padded: torch.Tensor) -> torch.Tensor:
    """(B,) index of each right-padded row's last real entry (pad = -1).

    An all-padding row gives 0.
    """
    return ((padded >= 0).sum(1) - 1).clamp(min=0)


def last_items(padded: torch.Tensor) -> torch.Tensor:
    """(B,) each right-padded row's last real entry (pad = -1).

    An all-padding row gives its first entry.
    """
    return padded[torch.arange(len(padded)), last_positions(padded)]
