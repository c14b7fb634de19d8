"""Item-memory rows merged by catalogue usage.

Some parameters are tables whose rows are read by particular items (a family names them and
counts their readers, :meth:`fedmerge.models.Recommender.row_usage`: a text-code table, say).
Fine-tuning on a domain changes only the rows that its items read, so summing or averaging
task vectors there writes one domain's item memory into the rows that another domain's items
read. The server knows which rows every domain's items read from the public item tables alone,
so ``rows = "usage"`` merges each row as the domains' updates weighted by the fraction of each
domain's items that read it: a row read by one domain keeps that domain's update whole, a
shared row gets the usage-weighted mean, and a row that no domain reads keeps the method's
value. Fractions, not counts, so that every domain counts the same whatever the size of its
catalogue (with counts, books' 38,519 items outweigh movies' 3,416 in almost every row that
movies reads).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedmerge.merge.methods import Prepared
from fedmerge.merge.vectors import StateDict

RowMode = Literal["usage", "method"]


def usage_rows(
    prepared: Prepared, vectors: list[StateDict], usage: dict[str, torch.Tensor]
) -> Prepared:
    """`prepared` with each key of `usage` rewritten so the initial merge's rows are read-weighted.

    Row r of the initial merge becomes sum_k share_k(r) tau_k[r].

    ``vectors`` are the raw task vectors tau_k; ``usage[key]`` is (K, rows): how many of domain
    k's items read each row of ``key``. With f_k(r) = usage[k, r] / sum_r' usage[k, r'] (the
    fraction of domain k's reads), share_k(r) = f_k(r) / sum_j f_j(r). The rows
    are stored divided by the initial coefficient w_k, so that theta_0 + sum_k w_k tau~_k
    gives the usage-weighted rows and learned coefficients scale each domain's share; a domain
    whose initial coefficient is 0 contributes nothing, as with the method alone.
    """
    out = [dict(v) for v in prepared.vectors]
    for key, counts in usage.items():
        fractions = counts.to(vectors[0][key].dtype) / counts.sum(1, keepdim=True).clamp(min=1)
        total = fractions.sum(0)
        read = (total > 0).view(-1, *[1] * (vectors[0][key].dim() - 1))
        shares = fractions / total.clamp(min=torch.finfo(total.dtype).tiny)
        for k, w in enumerate(prepared.weights):
            share = (
                shares[k].view_as(read) * vectors[k][key] / w
                if w
                else torch.zeros_like(vectors[k][key])
            )
            out[k][key] = torch.where(read, share, prepared.vectors[k][key])
    return Prepared(out, list(prepared.weights))
