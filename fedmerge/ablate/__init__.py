"""A grid of federated runs: privacy setting x target epsilon x merge method x seed, one table.

Every row starts from one federation preset (``preset``) and changes only the keys of the grid:
the privacy mechanism and its target epsilon, the merge, and the seed. Per seed the non-private
runs come first (``privacy.mechanism = none``, reported with a target epsilon of ``inf``), then
every setting x epsilon x method. The runs use the in-process backend, each in its own run
directory ``OUT/runs/<setting>-eps<E>-<method>-seed<S>/``; a complete run (``run.json`` says
``complete``, with the same federation config) is reused, so the same command given again after
an interruption resumes the grid.

Rows that share local training reuse it (:mod:`fedmerge.ablate.cache`). The ``learned`` run also
yields the training-free ``ties`` rows (its ``ties (training-free)`` model), so ``ties`` and
``learned`` share one run. A merge that a mechanism cannot protect (``central-dp`` noises only a
plain mean) is listed as not possible.

The table, ``OUT/ablate.csv`` and ``OUT/ablate.md``, has one row per setting, target epsilon,
method, seed and domain; ``OUT/ablate.png`` draws recall@10 against epsilon
(:mod:`fedmerge.ablate.report`).

Modules: :mod:`~fedmerge.ablate.config` (the ablation's keys and their checks),
:mod:`~fedmerge.ablate.grid` (the planned runs and table entries), :mod:`~fedmerge.ablate.cache`
(the kept local trainings), :mod:`~fedmerge.ablate.folder` (the ablation's folder and its complete
runs), :mod:`~fedmerge.ablate.run` (running the grid) and :mod:`~fedmerge.ablate.report` (the
table and the figure).
"""

from fedmerge.ablate.cache import load_training, save_training, training_key
from fedmerge.ablate.config import AblateConfig
from fedmerge.ablate.folder import default_out
from fedmerge.ablate.grid import plan
from fedmerge.ablate.run import run_ablation

__all__ = [
    "AblateConfig",
    "default_out",
    "load_training",
    "plan",
    "run_ablation",
    "save_training",
    "training_key",
]
