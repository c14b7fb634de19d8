"""Training-free merges behind one registry (name -> params model + function), as in mergekit.

Every method turns the task vectors tau_k into processed vectors tau~_k and initial
coefficients w_k, so that the merged model is theta_0 + sum_k w_k tau~_k. The same pair is the
starting point of learned coefficients (:mod:`fedmerge.merge.learn`): with w fixed, it *is*
the training-free merge.

Trimming (TIES, magnitude pruning, DARE-TIES) keeps the top ``density`` fraction of each
vector's entries by magnitude, either over the whole flattened vector (``scope = "global"``,
as the TIES paper's code and MergeRec do) or within each tensor (``scope = "tensor"``, as
mergekit does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

import torch
from pydantic import Field

from fedmerge.config import ConfigModel, validate
from fedmerge.errors import FedmergeError
from fedmerge.merge.vectors import StateDict, combine, flatten, nonfinite, task_vector, unflatten

Scope = Literal["global", "tensor"]
Coefficient = Annotated[float, Field(ge=-100.0, le=100.0)]
"""A merge coefficient (lambda, a model's weight): at most 100 in size."""


@dataclass(frozen=True)
class Prepared:
    """Processed task vectors tau~_k and their initial coefficients w_k."""

    vectors: list[StateDict]
    weights: list[float]


class Params(ConfigModel):
    """The parameters of a merge method (finite, and coefficients bounded: :data:`Coefficient`)."""


class AverageParams(Params):
    """The parameters of :func:`average`."""

    weights: list[Coefficient] | None = Field(
        None, description="one weight per model (default: 1/K each)"
    )


class TaskArithmeticParams(Params):
    """The parameters of :func:`task_arithmetic`."""

    lam: Coefficient = Field(0.2, description="lambda: the same coefficient for every task vector")


class TiesParams(Params):
    """The parameters of :func:`ties`."""

    density: float = Field(
        0.2, gt=0.0, le=1.0, description="fraction of entries kept per task vector"
    )
    scope: Scope = Field(
        "global", description="trim over the whole flattened vector (global) or per tensor"
    )
    lam: Coefficient = Field(1.0, description="scale of the merged vector (1 = TIES)")


class DareParams(Params):
    """The parameters of :func:`dare`."""

    p: float = Field(
        0.5, ge=0.0, le=0.99, description="drop rate; kept entries are scaled by 1/(1-p)"
    )
    seed: int = Field(0, description="seed of the random drops")
    then: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="the merge applied after dropping"
    )
    lam: Coefficient = Field(0.2, description="lambda of the method applied after dropping")
    density: float = Field(1.0, gt=0.0, le=1.0, description="with then = ties: TIES density")
    scope: Scope = Field("global", description="with then = ties: trim globally or per tensor")


class MagnitudeParams(Params):
    """The parameters of :func:`magnitude`."""

    density: float = Field(
        0.2, gt=0.0, le=1.0, description="fraction of entries kept, by magnitude"
    )
    scope: Scope = Field(
        "global", description="trim over the whole flattened vector (global) or per tensor"
    )
    lam: Coefficient = Field(0.2, description="coefficient of every pruned task vector")


class BreadcrumbsParams(Params):
    """The parameters of :func:`breadcrumbs`."""

    density: float = Field(0.9, gt=0.0, le=1.0, description="fraction of entries kept per tensor")
    gamma: float = Field(
        0.01, ge=0.0, lt=1.0, description="fraction of the largest entries dropped as outliers"
    )
    lam: Coefficient = Field(0.2, description="coefficient of every pruned task vector")


class ModelStockParams(Params):
    """The parameters of :func:`model_stock`: none."""


class MergeRecTiesParams(Params):
    """The parameters of :func:`mergerec_ties`."""

    density: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="fraction kept of each whole flattened task vector: "
        "int(density * numel) entries by magnitude (MergeRec's ties_density)",
    )
    lam: Coefficient = Field(
        1.0, description="weight of every trimmed task vector; the survivors are summed"
    )
    weights: list[Coefficient] | None = Field(
        None, description="one weight per model (default: lam each)"
    )


def _trim(vector: StateDict, density: float, scope: Scope) -> StateDict:
    """Keep the top `density` fraction of entries by magnitude.

    The fraction is taken over the whole vector or per tensor.
    """
    if density >= 1.0:
        return dict(vector)
    if scope == "tensor":
        return {k: _keep_top(v, density) for k, v in vector.items()}
    return unflatten(_keep_top(flatten(vector), density), vector)


def _keep_top(tensor: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, round(density * tensor.numel()))
    if keep >= tensor.numel():
        return tensor.clone()
    threshold = tensor.abs().reshape(-1).kthvalue(tensor.numel() - keep + 1).values
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def _disjoint(vectors: list[StateDict]) -> list[StateDict]:
    """TIES sign election and disjoint mean: tau~_k = tau_k * [sign agrees] / (number agreeing)."""
    out: list[StateDict] = [{} for _ in vectors]
    for key in vectors[0]:
        stack = torch.stack([v[key] for v in vectors])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(0).clamp(min=1)
        for k in range(len(vectors)):
            out[k][key] = torch.where(agree[k], stack[k], torch.zeros_like(stack[k])) / count
    return out


def average(vectors: list[StateDict], params: AverageParams) -> Prepared:
    """A weighted average: theta_0 + sum_k w_k tau_k, with w_k = 1/K unless `weights` are given."""
    weights = params.weights or [1.0 / len(vectors)] * len(vectors)
    if len(weights) != len(vectors):
        raise FedmergeError(
            f"average: {len(weights)} weights for {len(vectors)} models; give one weight per model"
        )
    return Prepared(list(vectors), list(weights))


def task_arithmetic(vectors: list[StateDict], params: TaskArithmeticParams) -> Prepared:
    """Task arithmetic: theta_0 + lam * sum_k tau_k."""
    return Prepared(list(vectors), [params.lam] * len(vectors))


def ties(vectors: list[StateDict], params: TiesParams) -> Prepared:
    """TIES: trim each task vector to `density`, elect signs, take the disjoint mean, times lam."""
    return Prepared(
        _disjoint([_trim(v, params.density, params.scope) for v in vectors]),
        [params.lam] * len(vectors),
    )


def dare(vectors: list[StateDict], params: DareParams) -> Prepared:
    """DARE: drop entries at rate `p`, scale the rest by 1/(1-p), then task arithmetic or TIES."""
    generator = torch.Generator().manual_seed(params.seed)
    dropped = [
        {
            k: t * (torch.rand(t.shape, generator=generator) >= params.p) / (1 - params.p)
            for k, t in v.items()
        }
        for v in vectors
    ]
    if params.then == "ties":
        return ties(dropped, TiesParams(density=params.density, scope=params.scope, lam=params.lam))
    return task_arithmetic(dropped, TaskArithmeticParams(lam=params.lam))


def magnitude(vectors: list[StateDict], params: MagnitudeParams) -> Prepared:
    """Magnitude pruning: keep each task vector's top `density` entries, each vector times lam."""
    return Prepared(
        [_trim(v, params.density, params.scope) for v in vectors], [params.lam] * len(vectors)
    )


def breadcrumbs(vectors: list[StateDict], params: BreadcrumbsParams) -> Prepared:
    """Per tensor, drop the top `gamma` (outliers) and the smallest entries, keeping `density`."""

    def crumbs(tensor: torch.Tensor) -> torch.Tensor:
        upper = _keep_top(tensor, min(1.0, params.density + params.gamma))
        outliers = _keep_top(tensor, params.gamma) if params.gamma > 0 else torch.zeros_like(tensor)
        return torch.where(outliers != 0, torch.zeros_like(tensor), upper)

    return Prepared(
        [{k: crumbs(t) for k, t in v.items()} for v in vectors], [params.lam] * len(vectors)
    )


def model_stock(vectors: list[StateDict], params: ModelStockParams) -> Prepared:
    """Model Stock: per tensor theta_0 + t mean(tau), t = Kc/(1+(K-1)c), c mean pairwise cosine."""
    n = len(vectors)
    out: list[StateDict] = [{} for _ in vectors]
    for key in vectors[0]:
        flat = torch.stack([v[key].reshape(-1) for v in vectors])
        unit = torch.nn.functional.normalize(flat, dim=1)
        cos = ((unit @ unit.T).sum() - n) / max(1, n * (n - 1)) if n > 1 else torch.tensor(1.0)
        ratio = (n * cos / (1 + (n - 1) * cos)).clamp(0.0, 1.0)
        for k in range(n):
            out[k][key] = vectors[k][key] * ratio / n
    return Prepared(out, [1.0] * n)


def mergerec_ties(vectors: list[StateDict], params: MergeRecTiesParams) -> Prepared:
    """MergeRec's stand-alone TIES: a weighted sum of globally trimmed task vectors, no election.

    Reproduces ``merge_ties`` in ``rec_retrieval/merger/algorithms/ties.py`` of
    DIALLab-SKKU/MergeRec (commit 7d78ef2), the function ``ModelMerger.merge("ties", weights,
    density=...)`` dispatches to: each update ``tau_k = theta_k - theta_0`` over the whole flattened
    model is multiplied by ``weights[k]``, its ``int(density * numel)`` largest entries by magnitude
    are kept (``torch.topk``: exactly that many, floored, none when it rounds down to 0), and the
    survivors are summed onto theta_0: theta_0 + sum_k w_k trim(tau_k). Multiplying by a scalar does
    not change which entries are largest, so here trim(tau_k) is the processed vector and w_k its
    coefficient.

    It differs from :func:`ties` (TIES proper, and MergeRec's learned-merge initialisation
    ``get_ties_vectors``) by having no sign election and no disjoint mean: entries kept by several
    models add up, whatever their signs. It is :func:`magnitude` with ``scope = "global"`` except
    that it keeps exactly ``int(density * numel)`` entries (:func:`magnitude` keeps
    ``max(1, round(density * numel))``, and every entry tied with the last kept one). MergeRec's
    ``merge_ties`` has no defaults of its own: density 0.2 is its ``ties_density`` default, and
    lam = 1 its TIES weight (as in :func:`ties`).
    """
    weights = params.weights or [params.lam] * len(vectors)
    if len(weights) != len(vectors):
        raise FedmergeError(
            f"mergerec_ties: {len(weights)} weights for {len(vectors)} models; "
            "give one weight per model"
        )

    def trim(vector: StateDict) -> StateDict:
        flat = flatten(vector)
        kept = torch.topk(flat.abs(), int(params.density * flat.numel()), largest=True).indices
        sparse = torch.zeros_like(flat)
        sparse[kept] = flat[kept]
        return unflatten(sparse, vector)

    return Prepared([trim(v) for v in vectors], list(weights))


P = TypeVar("P", bound=Params)


@dataclass(frozen=True)
class Method(Generic[P]):
    """A registered training-free merge: its parameters model and the function that takes them."""

    params: type[P]
    prepare: Callable[[list[StateDict], P], Prepared]


METHODS: dict[str, Method[Any]] = {
    "average": Method(AverageParams, average),
    "task_arithmetic": Method(TaskArithmeticParams, task_arithmetic),
    "ties": Method(TiesParams, ties),
    "mergerec_ties": Method(MergeRecTiesParams, mergerec_ties),
    "dare": Method(DareParams, dare),
    "magnitude": Method(MagnitudeParams, magnitude),
    "breadcrumbs": Method(BreadcrumbsParams, breadcrumbs),
    "model_stock": Method(ModelStockParams, model_stock),
}


def method_params(name: str, values: dict | None = None) -> Params:
    """Validated parameters of method `name`; an unknown method or key is named in the error."""
    if name not in METHODS:
        raise FedmergeError(f"unknown merge method {name!r}; use one of: {', '.join(METHODS)}")
    return validate(METHODS[name].params, values or {}, prefix="method.")


def prepare(name: str, vectors: list[StateDict], params: Params | dict | None = None) -> Prepared:
    """Run method `name` on task vectors (params: a validated model, a dict, or None for defaults).

    Raises
    ------
    FedmergeError
        When a coefficient or a processed vector is NaN or infinite: naming the method and its
        parameters.
    """
    if not isinstance(params, Params):
        params = method_params(name, params)
    prepared = METHODS[name].prepare(vectors, params)
    check_finite(
        name, params, {f"coefficient {k}": torch.tensor(w) for k, w in enumerate(prepared.weights)}
    )
    for vector in prepared.vectors:
        check_finite(name, params, vector)
    return prepared


def check_finite(name: str, params: Params, state: StateDict) -> None:
    """Raise a FedmergeError naming `name`, its `params` and the first non-finite tensor of `state`.

    The tensor named is the first that holds NaN or an infinity.

    Parameters
    ----------
    name : str
        The merge method that computed `state`.
    params : Params
        Its parameters.
    state : StateDict
        Merged weights, processed task vectors or coefficients.
    """
    if (bad := nonfinite(state)) is not None:
        raise FedmergeError(
            f"merge method {name!r} with {params.model_dump()} gave NaN or infinite values in "
            f"{bad!r}; use smaller coefficients or check that the input models are finite"
        )


def merge(
    base: StateDict, models: list[StateDict], name: str, params: Params | dict | None = None
) -> StateDict:
    """The training-free merge `name` of fine-tuned `models` that all started from `base`."""
    if not isinstance(params, Params):
        params = method_params(name, params)
    prepared = prepare(name, [task_vector(base, m) for m in models], params)
    merged = combine(base, prepared.vectors, prepared.weights)
    check_finite(name, params, merged)
    return merged
