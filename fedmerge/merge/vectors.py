"""Task vectors over state dicts.

tau_k = theta_k - theta_0, and merged theta = theta_0 + sum_k w_k tau_k.

Only floating-point tensors are merged; integer buffers (hash offsets and the like) must be
equal across models and are copied from the base.
"""

from __future__ import annotations

import torch

from fedmerge.errors import FedmergeError
from fedmerge.models.family import StateDict, nonfinite


def check_aligned(base: StateDict, models: list[StateDict], names: list[str] | None = None) -> None:
    """Raise a FedmergeError naming the first model that does not align with `base` or holds NaN."""
    names = names or [f"model {k}" for k in range(len(models))]
    for name, model in zip(names, models, strict=True):
        missing, extra = sorted(set(base) - set(model)), sorted(set(model) - set(base))
        if missing or extra:
            raise FedmergeError(
                f"{name} does not match the base: {'lacks' if missing else 'has extra'} tensor "
                f"{(missing or extra)[0]!r}; merge models fine-tuned from the same base config"
            )
        for key, tensor in base.items():
            if model[key].shape != tensor.shape:
                raise FedmergeError(
                    f"{name}: tensor {key!r} has shape {tuple(model[key].shape)}, the base has "
                    f"{tuple(tensor.shape)}; merge models fine-tuned from the same base config"
                )
            if not tensor.is_floating_point() and not torch.equal(model[key], tensor):
                raise FedmergeError(
                    f"{name}: integer tensor {key!r} differs from the base's; "
                    "it was not fine-tuned from this base"
                )
        if (bad := nonfinite(model)) is not None:
            raise FedmergeError(
                f"{name}: tensor {bad!r} holds NaN or infinite values; it cannot be merged"
            )


def task_vector(base: StateDict, model: StateDict) -> StateDict:
    """theta_k - theta_0 over the floating-point tensors."""
    return {k: model[k] - v for k, v in base.items() if v.is_floating_point()}


def combine(
    base: StateDict, vectors: list[StateDict], weights: list[float] | torch.Tensor
) -> StateDict:
    """theta_0 + sum_k weights[k] * vectors[k] (tensors absent from the vectors are the base's)."""
    merged = dict(base)
    for key in vectors[0] if vectors else []:
        merged[key] = base[key] + sum(w * v[key] for w, v in zip(weights, vectors, strict=True))
    return merged


def flatten(vector: StateDict) -> torch.Tensor:
    """All tensors of a task vector as one 1-d tensor (in key order)."""
    return torch.cat([t.reshape(-1) for t in vector.values()])


def unflatten(flat: torch.Tensor, like: StateDict) -> StateDict:
    """The inverse of :func:`flatten` for a vector shaped like `like`."""
    out, start = {}, 0
    for key, tensor in like.items():
        out[key] = flat[start : start + tensor.numel()].view_as(tensor)
        start += tensor.numel()
    return out
