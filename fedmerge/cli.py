"""The ``fedmerge`` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedmerge.config import apply_overrides, load_config, validate
from fedmerge.data.catalog import import_domain, imported_names, load_domain
from fedmerge.data.download import archive_path, fetch
from fedmerge.data.importers import IMPORTERS
from fedmerge.data.importers.recbole import write_recbole
from fedmerge.data.registry import REGISTRY, get_spec
from fedmerge.errors import FedmergeError
from fedmerge.evaluate import EvalProtocol, evaluate_domain, model_scorer
from fedmerge.evaluate.popularity import popularity_scorer
from fedmerge.merge import METHODS
from fedmerge.merge.learn import Mode
from fedmerge.merge.losses import LOSSES
from fedmerge.merge.run import merge_run
from fedmerge.merge.server import MergeConfig
from fedmerge.models import family, load_parts
from fedmerge.protocol import FederationConfig
from fedmerge.runs.outdir import Output, check_out
from fedmerge.runs.results import metric_row, metrics_table, write_metrics
from fedmerge.text import feature_table, get_encoder
from fedmerge.train.checkpoint import load_checkpoint
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.run import pretrain_config, train_run

if TYPE_CHECKING:
    from collections.abc import Callable

    from fedmerge.pipeline import RoundResult, Transport
    from fedmerge.runs.rundir import RunDir

app = typer.Typer(
    help="Federated cross-domain sequential recommendation by model merging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Datasets: list, download, inspect, import, export.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
deploy_app = typer.Typer(
    help="Multi-node deployment: the credentials of a secure one.", no_args_is_help=True
)
app.add_typer(deploy_app, name="deploy")
console = Console(markup=False)  # text is text: a path or name with [...] prints as given

BASELINES = {"popularity": popularity_scorer}


def _split_names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise FedmergeError(f"domain list {value!r} names a domain twice; give each domain once")
    return names


@data_app.command("list")
def data_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registered domains (and your imports)."""
    rows = [
        {
            "name": s.name,
            "format": s.format,
            "description": s.description,
            "users": s.expected[0],
            "items": s.expected[1],
            "interactions": s.expected[2],
            "url": s.url,
            "sha256": s.sha256,
            "licence": s.licence,
            "cached": archive_path(s).exists(),
        }
        for s in REGISTRY.values()
    ]
    rows += [
        {"name": name, "format": "imported", "description": "imported by you"}
        for name in imported_names()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(
        title="fedmerge domains",
        caption="also synth-0, synth-1, ...: generated, no download; "
        "--json adds URLs, sha256 and licences",
        caption_justify="left",
    )
    columns = ("name", "format", "users", "items", "interactions", "cached")
    for column in columns:
        table.add_column(
            column, justify="right" if column in ("users", "items", "interactions") else "left"
        )
    for row in rows:
        table.add_row(*(f"{v:,}" if type(v := row.get(c, "")) is int else str(v) for c in columns))
    console.print(table)


@data_app.command("download")
def data_download(
    names: Annotated[list[str] | None, typer.Argument(help="Registered domain names.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Download every registered domain.")] = False,
) -> None:
    """Download archives into the cache (verified by sha256)."""
    if not names and not all_:
        raise FedmergeError("name the domains to download, or pass --all")
    for name in list(REGISTRY) if all_ else names or []:
        path = fetch(get_spec(name))
        console.print(f"{name}: {path}", soft_wrap=True, highlight=False)


@data_app.command("info")
def data_info(
    names: Annotated[
        list[str] | None, typer.Argument(help="Domain names (default: every registered one).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (one object, or a list for several).")
    ] = False,
) -> None:
    """Counts of a domain's whole data set: users, items, interactions (all splits)."""
    summaries = [load_domain(name, quiet=as_json).summary() for name in (names or list(REGISTRY))]
    if as_json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
        return
    table = Table(title="domains")
    columns = ("name", "users", "items", "interactions", "density", "text_fields")
    for column in columns:
        table.add_column(column, justify="left" if column in ("name", "text_fields") else "right")
    for s in summaries:
        table.add_row(
            *(
                ", ".join(v)
                if isinstance(v := s[c], list)
                else v
                if isinstance(v, str)
                else f"{v:,}"
                for c in columns
            )
        )
    console.print(table)


@data_app.command("import")
def data_import(
    path: Annotated[
        Path,
        typer.Argument(
            help="Archive: MergeRec .tar.gz, SeqRecBenchmark proc.zip, or RecBole folder."
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(IMPORTERS)}.")],
    name: Annotated[str, typer.Option("--name", help="Domain name to use it under.")],
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Unpickle an unpinned seqrec-zip (runs its code)."),
    ] = False,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace", help="Replace an earlier import of NAME (kept if this import fails)."
        ),
    ] = False,
) -> None:
    """Import your own archive as domain NAME."""
    summary = import_domain(path, fmt, name, allow_pickle=allow_pickle, replace=replace).summary()
    console.print(
        f"imported {name}: {summary['users']:,} users, {summary['items']:,} items, "
        f"{summary['interactions']:,} interactions"
    )


@data_app.command("export")
def data_export(
    name: Annotated[str, typer.Argument(help="Domain to export.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write NAME.inter and NAME.item into.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="Only 'recbole'.")] = "recbole",
) -> None:
    """Export a domain as RecBole atomic files."""
    if fmt != "recbole":
        raise FedmergeError(f"cannot export to {fmt!r}; the only export format is recbole")
    for path in write_recbole(load_domain(name), out):
        console.print(f"wrote {path}")


@data_app.command("features")
def data_features(
    names: Annotated[list[str], typer.Argument(help="Domain names.")],
    encoder: Annotated[
        str, typer.Option("--encoder", help="minilm (all-MiniLM-L6-v2) or hashing.")
    ] = "minilm",
) -> None:
    """Compute (or find cached) the frozen item-text feature table of each domain."""
    text_encoder = get_encoder(encoder)
    for name in names:
        start = time.perf_counter()
        table = feature_table(load_domain(name), text_encoder)
        console.print(
            f"{name}: {table.shape[0]:,} items x {table.shape[1]} ({text_encoder.name}), "
            f"{time.perf_counter() - start:.1f} s"
        )


@app.command("evaluate")
def evaluate(
    domain: Annotated[
        str, typer.Option("--domain", help="Domain name, or several separated by commas.")
    ],
    baseline: Annotated[
        str | None, typer.Option("--baseline", help=f"One of: {', '.join(BASELINES)}.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A `fedmerge train` folder.")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="valid, test, or both.")] = "both",
    exclude_seen: Annotated[
        bool, typer.Option("--exclude-seen", help="Do not rank items already in the history.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 1024,
    candidates: Annotated[
        int | None,
        typer.Option(
            "--candidates",
            help="Rank each target among this many sampled "
            "negatives (default: full ranking over all items).",
        ),
    ] = None,
    sampler: Annotated[
        str, typer.Option("--sampler", help="With --candidates: uniform or popularity.")
    ] = "uniform",
    out: Annotated[
        Path | None, typer.Option("--out", help="Write metrics.json and metrics.csv here.")
    ] = None,
) -> None:
    """Evaluate a baseline or a trained checkpoint on domains' private splits.

    By full ranking, or over candidate lists.
    """
    protocol = validate(EvalProtocol, {"candidates": candidates, "sampler": sampler})
    if (baseline is None) == (checkpoint is None):
        raise FedmergeError("give either --baseline NAME or --checkpoint DIR")
    if baseline is not None and baseline not in BASELINES:
        raise FedmergeError(f"unknown baseline {baseline!r}; use one of: {', '.join(BASELINES)}")
    splits = {"both": ["valid", "test"], "valid": ["valid"], "test": ["test"]}.get(split)
    if splits is None:
        raise FedmergeError(f"unknown split {split!r}; use valid, test or both")
    names = _split_names(domain)
    if out is not None:
        check_out(out, "evaluate")
    if checkpoint is not None:
        model, config, _ = load_checkpoint(checkpoint)
        label = str(checkpoint)
        scorers = {
            p.domain.name: (p.domain, model_scorer(model, p.features))
            for p in load_parts(names, config.model)
        }
    else:
        assert baseline is not None  # exactly one of --baseline and --checkpoint, checked above
        label = baseline
        scorers = {name: (load_domain(name), BASELINES[baseline]) for name in names}
    rows = []
    for name, (data, scorer) in scorers.items():
        for part in splits:
            metrics = evaluate_domain(
                scorer,
                data,
                part,
                batch_size=batch_size,
                exclude_seen=exclude_seen,
                protocol=protocol,
            )
            rows.append(
                metric_row(
                    label, name, part, metrics | {"exclude_seen": exclude_seen}, protocol.name()
                )
            )
    console.print(metrics_table(rows, title=f"{label}"))
    if out is not None:
        with Output(
            out, "evaluate", {"checkpoint": str(checkpoint), "baseline": baseline}
        ).writing() as folder:
            write_metrics(rows, folder)
        console.print(f"wrote {out / 'metrics.json'} and {out / 'metrics.csv'}")


@app.command("train")
def train(
    out: Annotated[Path, typer.Option("--out", help="Checkpoint folder to write.")],
    domain: Annotated[
        str | None, typer.Option("--domain", help="The domain to fine-tune on.")
    ] = None,
    joint: Annotated[
        bool, typer.Option("--joint", help="Train one model on the pooled data of --domains.")
    ] = False,
    domains: Annotated[
        str | None, typer.Option("--domains", help="With --joint: domains separated by commas.")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Model family (model.kind): textseq, textenc, or one "
            "registered by a FEDMERGE_PLUGINS module.",
        ),
    ] = "textseq",
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="TOML file or preset name in configs/ (default: the preset named like --model).",
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start from this checkpoint instead of the seeded base."),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Fine-tune a recommender on one domain's private data (or jointly on several)."""
    if joint == (domain is not None) or (joint and not domains) or (domains and not joint):
        raise FedmergeError("give --domain NAME, or --joint --domains A,B,...")
    family(model)  # an unknown family is named, with the registered ones
    if joint:
        assert domains is not None  # checked above
        names = _split_names(domains)
    else:
        assert domain is not None  # checked above
        names = [domain]
    experiment = load_config(
        config or model, [f"model.kind={model}", *(overrides or [])], ExperimentConfig
    )
    rows = train_run(names, experiment, out, init=init, quiet=quiet)
    console.print(metrics_table(rows, title=f"{model} on {', '.join(names)}"))
    console.print(f"wrote {out}")


@app.command("pretrain")
def pretrain(
    domains: Annotated[
        str,
        typer.Option("--domains", help="Public domains outside the federation, e.g. steam,games."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Checkpoint folder: the base theta_0 for `train --init`.")
    ],
    config: Annotated[
        str | None, typer.Option("--config", help="TOML preset file or name in configs/.")
    ] = "textseq",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")
    ] = None,
    holdout: Annotated[
        str | None,
        typer.Option(
            "--holdout",
            help="Public domains never trained on whose zero-shot valid ndcg@10 picks the best "
            "epoch (the start, epoch 0, is a candidate), e.g. electronics.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Pretrain a shared base on public domains (joint training).

    Parties then fine-tune from it with --init.

    A textseq base trains its text adaptor only (train.frozen = blocks, positions, codes), which
    keeps the untrained model's text-similarity ranking; --set 'train.frozen=[]' trains everything.
    """
    names = _split_names(domains)
    held = _split_names(holdout) if holdout else None
    if held and set(held) & set(names):
        raise FedmergeError(
            f"--holdout {holdout} repeats a --domains domain; hold out domains that are not "
            "pretrained on"
        )
    rows = train_run(
        names,
        pretrain_config(config, overrides or []),
        out,
        quiet=quiet,
        label="pretrained",
        holdout=held,
    )
    console.print(metrics_table(rows, title=f"pretrained on {', '.join(names)}"))
    console.print(f"wrote {out}; fine-tune from it with `fedmerge train --init {out}`")


def merge_config(
    method: str | None,
    learn: str | None,
    loss: str | None,
    rows: str | None,
    overrides: list[str],
    preset: str | None = None,
) -> MergeConfig:
    """The merge of ``fedmerge merge``.

    The ``[merge]`` table of `preset` (a federation preset or TOML file; none: the defaults), then
    the options given (None: not given), then ``--set method.KEY=V`` / ``learn.KEY=V``.
    """
    start = load_config(preset, [], FederationConfig).merge if preset else MergeConfig()
    method = method or start.method
    tree = apply_overrides(
        {
            "method": dict(start.params) if method == start.method else {},
            "learn": start.learn.model_dump(mode="json")
            | {k: v for k, v in (("mode", learn), ("loss", loss)) if v},
        },
        overrides,
    )
    unknown = sorted(set(tree) - {"method", "learn"})
    if unknown:
        raise FedmergeError(f"--set {unknown[0]}.*: merge settings are method.KEY or learn.KEY")
    return validate(
        MergeConfig,
        {
            "method": method,
            "params": tree["method"],
            "learn": tree["learn"],
            "rows": rows or start.rows,
        },
    )


@app.command("merge")
def merge(
    base: Annotated[
        Path,
        typer.Option(
            "--base", help="theta_0: base.safetensors of a train folder, or a pretrain folder."
        ),
    ],
    models: Annotated[
        list[str],
        typer.Option(
            "--models",
            help="Fine-tuned train folders, one per domain, comma-separated or repeated.",
        ),
    ],
    domains: Annotated[
        str, typer.Option("--domains", help="The models' domains, in the same order.")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for merged.safetensors, coefficients.json, metrics."),
    ],
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="Start from the [merge] table of this federation preset or TOML file, e.g. "
            "simulate-mergerec (MergeRec as published); the options below and --set change it.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help=f"Training-free merge: {', '.join(METHODS)} (default: ties)."
        ),
    ] = None,
    learn: Annotated[
        str | None,
        typer.Option(
            "--learn", help=f"Coefficients: {', '.join(get_args(Mode))} (default: task-wise)."
        ),
    ] = None,
    loss: Annotated[
        str | None, typer.Option("--loss", help=f"Loss: {', '.join(LOSSES)} (default: mergerec).")
    ] = None,
    rows: Annotated[
        str | None,
        typer.Option(
            "--rows",
            help="Item-memory rows: usage (weighted by which domains' items "
            "read them, the default) or method.",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="method.KEY=V (merge method), learn.KEY=V, learn.pseudo.KEY=V."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Merge fine-tuned domain models (server side: updates and public item tables only)."""
    chosen = merge_config(method, learn, loss, rows, overrides or [], config)
    paths = [Path(p.strip()) for item in models for p in item.split(",") if p.strip()]
    metrics, outcome = merge_run(base, paths, _split_names(domains), chosen, out, quiet=quiet)
    mode = chosen.learn.mode
    console.print(
        metrics_table(
            metrics,
            title=f"{chosen.method} merge "
            f"({mode}{'' if mode == 'none' else ', ' + chosen.learn.loss})",
        )
    )
    weights, groups = outcome.coefficients["weights"], outcome.coefficients["groups"]
    console.print(
        f"coefficients {[[round(w, 3) for w in row] for row in weights]} ({', '.join(groups)}); "
        f"wrote {out}"
    )


@app.command("simulate")
def simulate(
    domains: Annotated[
        str | None,
        typer.Option("--domains", help="Domains, one party each (or parties_per_domain)."),
    ] = None,
    config: Annotated[
        str,
        typer.Option(
            "--config", help="TOML file or preset in configs/ (simulate, simulate-paper)."
        ),
    ] = "simulate",
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a key: rounds=2, train.max_minutes=5, merge.learn.steps=200, ...",
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="flower (Flower simulation on Ray) or inprocess.")
    ] = "flower",
    out: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/simulate"),
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Also show Flower's and Ray's own log lines and warnings (hidden by default).",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Run the parties on this running Ray cluster (HOST:PORT of its head, as `ray "
            "start --head` prints) instead of a local Ray; backend flower. Default: RAY_ADDRESS "
            "if set.",
        ),
    ] = None,
) -> None:
    """Run the federation: parties fine-tune privately, the server merges, every party evaluates.

    Prints a line per step (rounded; events.jsonl in the run directory keeps every value) and, at
    the end, the results table and the run directory.
    """
    from fedmerge.pipeline import InProcess
    from fedmerge.pipeline import simulate as run_simulation

    settings = [
        *(overrides or []),
        *([f"domains={json.dumps(_split_names(domains))}"] if domains else []),
    ]
    federation = load_config(config, settings, FederationConfig)
    if ray_address and backend != "flower":
        raise FedmergeError(
            f"--ray-address {ray_address} needs --backend flower (the in-process backend runs no "
            "Ray); drop one of them"
        )
    transport: Transport | Callable[[RunDir], list[RoundResult]]
    if backend == "inprocess":
        transport = InProcess(federation)
    elif backend == "flower":
        from server.simulation import flower_backend

        transport = flower_backend(federation, verbose=verbose, ray_address=ray_address)
    else:
        raise FedmergeError(f"unknown backend {backend!r}; use flower or inprocess")
    parties = (
        f"{federation.parties_per_domain} parties each"
        if federation.parties_per_domain > 1
        else "one party each"
    )
    shape = (
        f"{federation.rounds} round{'s' if federation.rounds > 1 else ''}"
        if federation.target is None
        else f"woven for {federation.target}"
    )
    if federation.domains:
        console.print(
            Text(
                f"fedmerge simulate: {', '.join(federation.domains)} ({parties}), {shape}, "
                f"backend {backend}, run directory {out}"
            ),
            soft_wrap=True,
            highlight=False,
        )
    try:
        run_simulation(federation, transport, out, console)
    # Ctrl-C, or SIGTERM (its name is the argument; see fedmerge.pipeline.simulate)
    except KeyboardInterrupt as err:
        import signal

        from fedmerge.runs.outdir import RECORD, partial_dir

        code = 128 + signal.Signals[str(err.args[0]) if err.args else "SIGINT"]
        console.print(
            f"interrupted: {partial_dir(out) / RECORD} says so; {out} is untouched and no results "
            "were written",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        if backend == "flower":
            from server.simulation import leave_after_interrupt

            leave_after_interrupt(code)
        raise typer.Exit(code) from None


@app.command("ablate")
def ablate(
    config: Annotated[
        str,
        typer.Option("--config", help="Ablation TOML file or preset in configs/ (ablate-privacy)."),
    ] = "ablate-privacy",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder of the ablation: runs/, training-cache/, ablate.csv, ablate.md, "
            "ablate.png (default: runs/ablate-<config stem>, a stem ablate-X gives runs/ablate-X).",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override an ablation key: epsilons=[8.0], seeds=[0,1], "
            "set='[\"train.epochs=5\"]', ...",
        ),
    ] = None,
) -> None:
    """A grid of privacy setting x epsilon x merge method x seed: one run each, one table.

    Every run is a federation of the preset, run in process into OUT/runs/NAME; runs that share
    local training reuse it. Given again after an interruption, the same command reuses the
    complete runs and the kept trainings.
    """
    from fedmerge.ablate import AblateConfig, default_out, run_ablation

    grid = load_config(config, overrides, AblateConfig)
    folder = out if out is not None else default_out(config)

    def say(text: str) -> None:
        console.print(Text(text), soft_wrap=True, highlight=False)

    say(f"fedmerge ablate: {config}, folder {folder}")
    try:
        run_ablation(grid, folder, say)
    # Ctrl-C, or SIGTERM during a run (its name is the argument; see fedmerge.pipeline.simulate)
    except KeyboardInterrupt as err:
        import signal

        say(
            f"interrupted: give the same command again to resume ({folder}: complete runs and "
            "kept trainings are reused; the interrupted run is not a result)"
        )
        code = 128 + signal.Signals[str(err.args[0]) if err.args else "SIGINT"]
        raise typer.Exit(code) from None
    say(f"wrote {folder / 'ablate.csv'}, {folder / 'ablate.md'} and {folder / 'ablate.png'}")


@deploy_app.command("certs")
def deploy_certs(
    out: Annotated[Path, typer.Option("--out", help="A new folder for the credentials.")],
    hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A name or address the SuperLink is reached by (repeat the option); default: "
            "superlink, localhost and 127.0.0.1.",
        ),
    ] = None,
    supernodes: Annotated[
        str,
        typer.Option(
            help="The SuperNodes, comma-separated: each gets an authentication key pair and a "
            "certificate for supernode-NAME, localhost and 127.0.0.1 (the compose file's: a,b).",
        ),
    ] = "a,b",
    days: Annotated[int, typer.Option(min=1, help="Days the certificates are valid.")] = 365,
) -> None:
    """Create a CA, TLS certificates and SuperNode authentication keys for a deployment.

    Then register each SuperNode's public key with the SuperLink (printed below); each party
    needs only ca.crt and its own folder (docs/deployment.md).
    """
    from fedmerge.certs import issue

    def plain(text: str) -> None:
        console.print(Text(text), soft_wrap=True, highlight=False)

    names = [name.strip() for name in supernodes.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise FedmergeError(f"--supernodes {supernodes!r} names a SuperNode twice; name each once")
    issued = issue(
        out,
        hosts or ["superlink", "localhost", "127.0.0.1"],
        {name: [f"supernode-{name}", "localhost", "127.0.0.1"] for name in names},
        days,
    )
    plain(f"wrote {issued.out}: ca.crt, superlink/, " + ", ".join(f"supernode-{n}/" for n in names))
    plain("register each SuperNode with the running SuperLink (CONNECTION: your flwr connection):")
    for key in issued.public_keys.values():
        plain(f"  flwr supernode register {key} CONNECTION")


@app.command("status")
def status(
    out: Annotated[Path, typer.Argument(help="The --out folder of a fedmerge command.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print JSON: {"out": record or null, '
            '"partial": record or null}, each with its liveness.',
        ),
    ] = False,
) -> None:
    """How the run in OUT ended, and whether the one in OUT.partial is running or dead.

    A command writes into OUT.partial and only a finished run replaces OUT. A partial run whose
    process is gone (killed, or its machine went down), or whose heartbeat stopped, is dead: the
    same command given again replaces it (``train`` resumes it).
    """
    from fedmerge.runs.outdir import RECORD, liveness, partial_dir, read_record

    now = time.time()
    records = {"out": read_record(out), "partial": read_record(partial_dir(out))}
    if records["out"] is None and records["partial"] is None:
        raise FedmergeError(
            f"{out} holds no fedmerge run (no {RECORD} in it or in {partial_dir(out)}); "
            "give the --out of a fedmerge command"
        )
    for record in records.values():
        if record is not None:
            record["liveness"] = liveness(record, now)
    if as_json:
        print(json.dumps(records, indent=2))
        return

    def ago(stamp: float) -> str:
        seconds = now - float(stamp)
        return (
            f"{seconds:.0f} s"
            if seconds < 120
            else f"{seconds / 60:.0f} min"
            if seconds < 7200
            else f"{seconds / 3600:.1f} h"
        )

    plain = Console(markup=False, highlight=False, soft_wrap=True)
    for folder, record in ((out, records["out"]), (partial_dir(out), records["partial"])):
        if record is None:
            continue
        command, state = record.get("command", "?"), record.get("status", "?")
        if record["liveness"] == "live":
            state = (
                f"running (PID {record.get('pid')} on {record.get('host')}, heartbeat "
                f"{ago(record['heartbeat'])} ago)"
            )
        elif record["liveness"] == "dead":
            beat = time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.localtime(float(record.get("heartbeat", 0)))
            )
            state = (
                f"dead: the process that wrote it is gone (PID {record.get('pid')} on "
                f"{record.get('host')}, last heartbeat {beat}, {ago(record.get('heartbeat', 0))} "
                "ago); rerun the command to "
                + ("resume it" if command == "train" else "replace it")
            )
        elif "signal" in record:
            state += f" ({record['signal']})"
        facts = [f"{key} {record[key]}" for key in ("started", "ended") if key in record]
        facts += [f"{record['seconds']} s"] if "seconds" in record else []
        plain.print(
            f"{folder}: {command} {state}"
            + "".join(f", {fact}" for fact in facts)
            + (f"\n  error: {record['error']}" if "error" in record else "")
        )


def main() -> None:
    """Entry point: run the typer app; bad input is one line on stderr, exit code 2.

    Bad input is a FedmergeError, or a file that cannot be read or written.
    """
    try:
        app()
    except FedmergeError as err:
        _fail(str(err))
    # a full disk, a missing permission, a path that is not what it should be
    except OSError as err:
        name = err.filename or "a file"
        _fail(
            f"cannot use {name} ({err.strerror or err}); check the path, its permissions and the "
            "free disk space"
        )


def _fail(message: str) -> None:
    Console(stderr=True, markup=False).print(
        Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True
    )
    sys.exit(2)
