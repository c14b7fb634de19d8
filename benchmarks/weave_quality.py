"""WeaveRec in a federation: woven merges against their baselines, per setting and weaving seed.

Protocol: for each setting (``--settings``: ``target<source`` or ``target<source1+source2``) and
each seed of the weaving order (``--seeds``: ``weave.seed``, each leg's batches), one woven run
of the ``weaverec`` preset (``fedmerge simulate --config weaverec --backend inprocess``; the
parties' own adapters, the hybrids, the FedAvg adapter, the naive and the woven merge), plus,
once per setting, a *joint* adapter trained offline on the pooled data of the target and its
sources (``fedmerge train`` on several domains, the preset's training settings: the non-private
reference, which no party could train). Every model is ranked by the target's party on the same
candidate lists for the same seeded users (the preset's protocol). Checked per setting and seed:
WeaveRec's finding, naive merge < target-only and woven merge >= target-only (ndcg@10).
*Cost*, per setting: the weaving's wall time, against training the same legs in one process
(``--cost``: the first seed's hybrids again, one optimiser, no routing), and the bytes that
crossed for the legs (every carry's tensors, to the party and back). Runs are kept under
``--runs`` and reused when complete; ``--no-joint`` leaves the joint adapter out (it does not
depend on the weaving seed: for a part of a setting whose joint an earlier part measured).

    python benchmarks/weave_quality.py [--settings "beauty<toys,toys<beauty,beauty<toys+sports"]
        [--seeds 0,1] [--runs runs/weave] [--cost] [--no-joint] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fedmerge.config import load_config
from fedmerge.models import build_model, load_parts
from fedmerge.pipeline import InProcess, simulate
from fedmerge.protocol import FederationConfig, base_weights, party_threads
from fedmerge.train.config import ExperimentConfig
from fedmerge.train.legs import Carry, train_leg
from fedmerge.train.run import train_run
from fedmerge.weaving import hybrid_legs


def _roles(setting: str) -> tuple[str, list[str]]:
    target, sources = setting.split("<")
    return target, sources.split("+")


def _config(setting: str, seed: int, overrides: list[str]) -> FederationConfig:
    target, sources = _roles(setting)
    return load_config(
        "weaverec",
        [f"target={target}", f"sources={json.dumps(sources)}", f"weave.seed={seed}", *overrides],
        FederationConfig,
    )


def _woven(config: FederationConfig, out: Path) -> list[dict]:
    """The woven run's test rows (run once, then read back)."""
    if not (out / "metrics.json").exists():
        simulate(config, InProcess(config), out)
    return [r for r in json.loads((out / "metrics.json").read_text()) if r["split"] == "test"]


def _joint(config: FederationConfig, out: Path) -> list[dict]:
    """The offline joint adapter on the pooled data, its test rows on the target."""
    experiment = ExperimentConfig(model=config.model, train=config.train)
    if not (out / "model.safetensors").exists():
        train_run(config.domains, experiment, out, label="joint", quiet=True)
    rows = json.loads((out / "metrics.json").read_text())
    return [
        r | {"model": "joint (pooled data, offline: not private)"}
        for r in rows
        if r["split"] == "test" and r["domain"] == config.target and r["model"] == "joint"
    ]


def _nbytes(carry: Carry) -> int:
    return sum(
        t.numel() * t.element_size() for t in [*carry.weights.values(), *carry.moments.values()]
    )


def _cost(config: FederationConfig, seconds: float) -> dict[str, float]:
    """The first hybrid's legs again in one process (seconds); the bytes its legs crossed."""
    weaving = config.weaving()
    assert weaving is not None
    parts = {p.domain.name: p for p in load_parts(config.domains, config.model, quiet=True)}
    width = parts[weaving.target].features.shape[1]
    model = build_model(config.model, width, config.seed)
    model.load_merged(base_weights(config, width))
    carry, crossed = Carry(model.exchanged(), {}), 0
    began = time.perf_counter()
    with party_threads(config):  # the threads the routed legs ran on
        for leg in hybrid_legs(weaving, weaving.sources[0]):
            sent = _nbytes(carry)
            carry, _ = train_leg(
                model,
                parts[leg.domain],
                config.train,
                carry,
                weaving.steps,
                weaving.seed,
                leg.visit,
            )
            crossed += sent + _nbytes(carry)
    return {
        "weaving s (all hybrids, routed)": round(seconds, 1),
        "one hybrid's legs in one process s": round(time.perf_counter() - began, 1),
        "MB crossed per hybrid": round(crossed / 1e6, 2),
    }


def _ndcg(rows: list[dict], prefix: str) -> float:
    return next(r["ndcg@10"] for r in rows if r["model"].startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="beauty<toys,toys<beauty,beauty<toys+sports")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    parser.add_argument("--runs", type=Path, default=Path("runs/weave"))
    parser.add_argument("--cost", action="store_true", help="also measure the weaving's cost")
    parser.add_argument("--no-joint", action="store_true", help="leave the joint adapter out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    lines, checks, costs = [], [], []
    for setting in args.settings.split(","):
        name = setting.replace("<", "-from-").replace("+", "-")
        joint = (
            []
            if args.no_joint
            else _joint(_config(setting, 0, args.overrides), args.runs / name / "joint")
        )
        for seed in args.seeds:
            config = _config(setting, seed, args.overrides)
            out = args.runs / name / f"seed{seed}"
            rows = _woven(config, out) + (joint if seed == args.seeds[0] else [])
            for r in rows:
                lines.append(
                    f"| {setting} | {seed} | {r['model']} | {r['recall@10']:.4f} | "
                    f"{r['ndcg@10']:.4f} |"
                )
            own, naive, woven = (
                _ndcg(rows, "target-only"),
                _ndcg(rows, "naive merge"),
                _ndcg(rows, "woven merge"),
            )
            below, above = naive < own, woven >= own
            checks.append(
                f"| {setting} | {seed} | {own:.4f} | {naive:.4f} ({'holds' if below else 'no'})"
                f" | {woven:.4f} ({'holds' if above else 'no'}) |"
            )
            if args.cost and seed == args.seeds[0]:
                events = (out / "events.jsonl").read_text().splitlines()
                done = [json.loads(e) for e in events if '"weave_done"' in e][-1]
                costs.append({"setting": setting} | _cost(config, done["seconds"]["weaving"]))
    protocol = (__doc__ or "").split("\n\n")[1]
    text = (
        f"# WeaveRec in a federation\n\n{protocol}\n\nMachine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads; settings: {' '.join(args.overrides) or 'preset'}."
        "\n\n| setting | seed | model | hit@10 | ndcg@10 |\n|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\n| setting | seed | target-only ndcg@10 | naive merge (< target-only?) | "
        "woven merge (>= target-only?) |\n|---|---|---|---|---|\n" + "\n".join(checks) + "\n"
    )
    if costs:
        keys = list(costs[0])
        text += (
            "\n| "
            + " | ".join(keys)
            + " |\n|"
            + "---|" * len(keys)
            + "\n"
            + "\n".join("| " + " | ".join(str(c[k]) for k in keys) + " |" for c in costs)
            + "\n"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weave_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
