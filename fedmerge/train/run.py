"""``fedmerge train``: data and features in, a checkpoint folder with metrics out.

The folder holds ``base.safetensors`` (theta_0, the weights training started from),
``model.safetensors`` (the best validation epoch), ``config.json`` (config, text size,
domains, training facts) and ``metrics.json`` / ``metrics.csv`` (valid and test rows for the
base and the trained model) and ``run.json`` (the run record). The run is written into
``OUT.partial`` and replaces ``OUT`` when it finished; until then ``trainer.safetensors`` /
``trainer.json`` there keep the state to resume it (:mod:`fedmerge.train.state`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from fedmerge.config import load_config
from fedmerge.data.domain import DomainData
from fedmerge.data.download import sha256_of
from fedmerge.evaluate import evaluate_domain, model_scorer
from fedmerge.files import write_json
from fedmerge.models import Part, Recommender, build_model, family, load_parts
from fedmerge.models.family import upgrade_stored
from fedmerge.runs.outdir import Output, check_out
from fedmerge.runs.results import Row, metric_row, write_metrics
from fedmerge.train.checkpoint import checkpoint_files, load_weights, save_weights
from fedmerge.train.config import ExperimentConfig, TrainConfig
from fedmerge.train.loop import calibrate, fit, resolve_device
from fedmerge.train.state import has_state, remove_state


def pretrain_config(preset: str | Path | None, overrides: list[str]) -> ExperimentConfig:
    """The config of ``fedmerge pretrain``.

    The preset and `overrides`, with ``train.frozen`` defaulting to the family's ``pretrain_frozen``
    (:class:`fedmerge.models.Recommender`).

    ``--set train.frozen=...`` (``[]``: none) or a preset whose ``train.frozen`` is not empty is
    kept as given; a preset's empty list reads as unset and gets the default.
    """
    config = load_config(preset, overrides, ExperimentConfig)
    named = config.train.frozen or any(
        o.partition("=")[0].strip() == "train.frozen" for o in overrides
    )
    frozen = family(config.model.kind).pretrain_frozen
    if not frozen or named:
        return config
    return load_config(preset, [*overrides, f"train.frozen={json.dumps(frozen)}"], ExperimentConfig)


def evaluate_rows(
    model: Recommender, parts: list[Part], label: str, config: TrainConfig | None = None
) -> list[Row]:
    """Valid and test rows of `model` on every part, ranked as ``config.evaluation`` says.

    Item vectors are computed once per part; the ranking (default: full ranking) is recorded in each
    row.
    """
    config = config or TrainConfig()
    rows = []
    for part in parts:
        scorer = model_scorer(model, part.features)
        rows += [
            metric_row(
                label,
                part.domain.name,
                split,
                evaluate_domain(
                    scorer, part.domain, split, config.eval_batch_size, protocol=config.evaluation
                ),
                config.evaluation.name(),
            )
            for split in ("valid", "test")
        ]
    return rows


def train_run(
    names: list[str],
    config: ExperimentConfig,
    out: Path,
    init: Path | None = None,
    quiet: bool = False,
    label: str | None = None,
    holdout: list[str] | None = None,
) -> list[Row]:
    """Train on `names` (one domain, or several jointly) and write the checkpoint folder `out`.

    Metric rows are labelled `label` (default: the model kind, or ``joint`` for several domains).
    With `holdout` domains (never trained on), validation, early stopping and the calibration
    read their zero-shot quality instead, and the rows include them.

    Every input is checked before anything is written; the run is written into
    ``OUT.partial`` and replaces `out` only once it finished (:mod:`fedmerge.runs.outdir`).
    An interrupted run keeps its trainer state there, and the same command resumes it; a run
    with any other input (domains, config, ``--init`` weights, data) is refused, named.
    """
    out = Path(out)
    check_out(out, "train")
    parts = load_parts(names, config.model, quiet=quiet)
    held = load_parts(holdout, config.model, quiet=quiet) if holdout else []
    model = build_model(config.model, parts[0].features.shape[1], config.train.seed)
    start = checkpoint_files(init)[0] if init is not None else None
    if start is not None:
        load_weights(model, start)
    model.to(resolve_device(config.train.device))  # the base is evaluated where the model trains
    inputs = {
        "domains": names,
        "holdout": holdout or [],
        "config": config.model_dump(mode="json"),
        "init": None if start is None else sha256_of(start),
        "data": {p.domain.name: fingerprint(p.domain) for p in parts + held},
    }
    output = Output(out, "train", inputs, resume=True)
    with output.writing(keep=lambda: has_state(output.dir)):
        rows = _train(model, parts, held, config, output.dir, label, quiet, init)
        remove_state(output.dir)
    return rows


def fingerprint(domain: DomainData) -> dict[str, object]:
    """What identifies a domain's data: its counts and the sha256 of the archive it came from."""
    return {
        "users": domain.n_users,
        "items": domain.n_items,
        "interactions": domain.n_interactions,
        "sha256": domain.source.get("sha256"),
    }


def _train(
    model: Recommender,
    parts: list[Part],
    held: list[Part],
    config: ExperimentConfig,
    folder: Path,
    label: str | None,
    quiet: bool,
    init: Path | None,
) -> list[Row]:
    """Train `model` (theta_0 or ``--init``) in `folder`.

    Writes the base, the state after each epoch, the model, facts and metrics.
    """
    save_weights(model, folder / "base.safetensors")
    rows = evaluate_rows(model, parts + held, "base", config.train)
    write_json(folder / "config.json", _facts(config, parts, init, held))
    result = fit(model, parts, config.train, state_dir=folder, quiet=quiet, holdout=held)
    model.load_state_dict(result.best_state)
    calibrated = calibrate(model, held or parts, config.train)
    save_weights(model, folder / "model.safetensors")
    label = label or ("joint" if len(parts) > 1 else config.model.kind)
    rows += evaluate_rows(model, parts + held, label, config.train)
    facts = _facts(config, parts, init, held) | {
        "best_epoch": result.best_epoch,
        "best_valid_ndcg@10": result.best_score,
        "stopped": result.stopped,
        "train_seconds": round(result.train_seconds, 2),
        "sequences_per_second": round(result.sequences_per_second, 1),
        "history": result.history,
        **model.facts(),
        "valid_ndcg@10_by_calibration": {str(w): v for w, v in calibrated.items()},
    }
    write_json(folder / "config.json", facts)
    write_metrics(rows, folder)
    if not quiet:
        Console(stderr=True, markup=False).print(
            f"best epoch {result.best_epoch} ({result.stopped}); "
            f"{result.train_seconds:.0f} s of training",
            highlight=False,
        )
    return rows


def same_config(path: Path, config: ExperimentConfig, holdout: list[str] | None = None) -> bool:
    """Whether the run described by `path` (a config.json) used `config`.

    And, with `holdout`, validated on it.

    The stored config is validated first, so a key added to the config since (with a default
    that keeps the old behaviour) does not make an old run look different.
    """
    if not path.exists():
        return False
    try:
        facts = json.loads(path.read_text())
        return ExperimentConfig.model_validate(
            upgrade_stored(facts.get("config", {}))
        ) == config and facts.get("holdout", []) == (holdout or [])
    except ValidationError:
        return False


def _facts(
    config: ExperimentConfig, parts: list[Part], init: Path | None, held: list[Part]
) -> dict:
    return {
        "config": config.model_dump(),
        "kind": config.model.kind,
        "text_dim": int(parts[0].features.shape[1]),
        "domains": [p.domain.name for p in parts],
        "holdout": [p.domain.name for p in held],
        "init": str(init) if init else None,
    }
