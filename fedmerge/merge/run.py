"""``fedmerge merge``: base + fine-tuned checkpoints in, a merged checkpoint with metrics out.

The server side only: it reads weights and each domain's public item table, builds
pseudo-users and teacher scores from them, and learns the merge coefficients. Each domain's
private splits are used only to evaluate the result and, with ``learn.valid_candidates``, to
score coefficient snapshots on valid, as the parties do in the federation.
Writes ``merged.safetensors`` + ``config.json`` (a checkpoint ``fedmerge evaluate`` reads),
``coefficients.json`` and, last, ``metrics.json`` / ``metrics.csv``.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from fedmerge.errors import FedmergeError
from fedmerge.files import write_json
from fedmerge.merge.server import Judge, Member, MergeConfig, MergeOutcome, server_merge
from fedmerge.merge.vectors import StateDict, check_aligned, task_vector
from fedmerge.models import Part, Recommender, build_model, load_parts
from fedmerge.runs.outdir import Output, check_out
from fedmerge.runs.results import Row, write_metrics
from fedmerge.train.checkpoint import checkpoint_files, load_checkpoint, read_state, save_weights
from fedmerge.train.config import ExperimentConfig, TrainConfig
from fedmerge.train.loop import resolve_device, validation_parts, validation_score
from fedmerge.train.run import evaluate_rows


def read_weights(path: Path) -> StateDict:
    """A safetensors file, or the weights of a checkpoint folder.

    Unreadable or non-finite weights are refused.
    """
    return read_state(checkpoint_files(path)[0])


def _valid_judge(model: Recommender, parts: list[Part], train: TrainConfig) -> Judge:
    """Each candidate's mean valid ndcg@10 over `parts` (``train.valid_users`` of each).

    This is what the parties report.
    """
    parts = validation_parts(parts, train.valid_users, train.seed)

    def judge(candidates: list[StateDict]) -> list[float]:
        scores = []
        for weights in candidates:
            model.load_merged(weights)
            scores.append(validation_score(model, parts, train))
        return scores

    return judge


def _same_start(start: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether a model's recorded start is `base`, up to the float noise of the thread count.

    The seeded init (an orthogonal projection via QR) differs by ~1e-7 between runs with
    different numbers of threads; another base or seed differs by orders of magnitude more.
    """
    if not start.is_floating_point():
        return torch.equal(start, base)
    return start.shape == base.shape and torch.allclose(start, base, rtol=0.0, atol=1e-5)


def merge_run(
    base_path: Path,
    model_paths: list[Path],
    domains: list[str],
    merge: MergeConfig,
    out: Path,
    quiet: bool = False,
) -> tuple[list[Row], MergeOutcome]:
    """Merge the fine-tuned checkpoints (one per domain, same base) and evaluate on every domain.

    Every input is checked first (each model trained on the domain it is listed for, from
    `base_path`); the result is written into ``OUT.partial`` and replaces `out` when done.
    """
    if not model_paths:
        raise FedmergeError(
            "--models is empty; give one fedmerge train folder per domain of --domains"
        )
    if len(model_paths) != len(domains):
        raise FedmergeError(
            f"{len(model_paths)} models for {len(domains)} domains; give one --models entry per "
            "domain"
        )
    if len(set(domains)) != len(domains):
        raise FedmergeError(
            "a domain is listed twice in --domains; each domain contributes one model"
        )
    out = Path(out)
    check_out(out, "merge")
    members = [load_checkpoint(p) for p in model_paths]
    config: ExperimentConfig = members[0][1]
    for path, (_, other, _) in zip(model_paths[1:], members[1:], strict=True):
        if other.model != config.model:
            raise FedmergeError(
                f"{path} was trained with another model config than {model_paths[0]}; "
                "merge models of one config"
            )
    states = [m.merge_space(m.exchanged()) for m, _, _ in members]
    base = {k: v for k, v in read_weights(base_path).items() if k in states[0]}
    check_aligned(base, states, domains)
    for path, name, (_, _, meta) in zip(model_paths, domains, members, strict=True):
        _check_member(Path(path), name, meta, base, base_path)
    parts = load_parts(domains, config.model, quiet=quiet)
    output = Output(
        out,
        "merge",
        {
            "base": str(base_path),
            "models": [str(p) for p in model_paths],
            "domains": domains,
            "merge": merge.model_dump(mode="json"),
        },
    )
    with output.writing() as folder:
        return _merge(base, states, members[0][2]["text_dim"], config, parts, merge, folder, quiet)


def _check_member(path: Path, domain: str, meta: dict, base: StateDict, base_path: Path) -> None:
    """Refuse a model that was not fine-tuned on `domain` alone, or not from `base`."""
    trained = meta.get("domains")
    if trained != [domain]:
        raise FedmergeError(
            f"{path} was trained on {', '.join(map(str, trained or ['no recorded domain']))}, "
            f"not on {domain}; list each model under the domain it was fine-tuned on"
        )
    weights, _ = checkpoint_files(path)
    start = weights.parent / "base.safetensors"
    if not start.is_file():
        raise FedmergeError(
            f"{path} has no base.safetensors beside its weights, so its start cannot be checked "
            "against --base; give the folder `fedmerge train` wrote"
        )
    if any(not _same_start(t, base[k]) for k, t in read_state(start).items() if k in base):
        raise FedmergeError(
            f"the {domain} model ({path}) was fine-tuned from another base than {base_path}; "
            "task vectors are only meaningful from a common base"
        )


def _merge(
    base: StateDict,
    states: list[StateDict],
    text_dim: int,
    config: ExperimentConfig,
    parts: list[Part],
    merge: MergeConfig,
    folder: Path,
    quiet: bool,
) -> tuple[list[Row], MergeOutcome]:
    """The merge, its files and its evaluation, written into `folder`."""
    domains = [p.domain.name for p in parts]
    members = [
        Member(name, task_vector(base, state), part.features)
        for name, state, part in zip(domains, states, parts, strict=True)
    ]
    skeleton = build_model(config.model, text_dim, config.train.seed).to(
        resolve_device(config.train.device)
    )
    judge = _valid_judge(skeleton, parts, config.train)
    outcome = server_merge(
        base,
        members,
        config.model,
        config.train.seed,
        merge,
        quiet=quiet,
        judge=judge,
        device=config.train.device,
    )
    skeleton.load_merged(outcome.merged)
    save_weights(skeleton, folder / "merged.safetensors")
    write_json(
        folder / "config.json",
        {
            "config": config.model_dump(),
            "kind": config.model.kind,
            "text_dim": text_dim,
            "domains": domains,
        },
    )
    coefficients = outcome.coefficients | {
        "merge_seconds": round(outcome.seconds, 2),
        "teacher_bytes": outcome.teacher_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    write_json(folder / "coefficients.json", coefficients)
    label = merge.method + (
        "" if merge.learn.mode == "none" else f"+{merge.learn.mode}:{merge.learn.loss}"
    )
    rows = evaluate_rows(skeleton, parts, label, config.train)
    write_metrics(rows, folder)
    return rows, outcome
