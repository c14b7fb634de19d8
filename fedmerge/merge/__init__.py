"""Model merging: task vectors, training-free methods behind one registry, learned coefficients."""

from fedmerge.merge.methods import METHODS, Prepared, merge, method_params, prepare
from fedmerge.merge.vectors import StateDict, check_aligned, combine, task_vector

__all__ = [
    "METHODS",
    "Prepared",
    "StateDict",
    "check_aligned",
    "combine",
    "merge",
    "method_params",
    "prepare",
    "task_vector",
]
