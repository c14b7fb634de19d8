"""The plan of an ablation: every federated run, in order, and every entry of the table.

A row's federation config is the preset after the ablation's ``set`` and the row's own keys: its
domains, seed, merge and privacy. A row whose merge its setting cannot protect gets no run, only
a note; the ``ties`` rows come from the ``learned`` run where there is one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fedmerge.ablate.config import METHOD_KEYS, NON_PRIVATE, AblateConfig
from fedmerge.config import CONFIG_DIR, load_config
from fedmerge.data.catalog import check_domain_name
from fedmerge.errors import FedmergeError
from fedmerge.privacy import PrivacyConfig, build_mechanism
from fedmerge.protocol import FederationConfig


@dataclass(frozen=True)
class Run:
    """One federated run of the grid: its directory name and its federation config."""

    name: str
    config: FederationConfig


@dataclass(frozen=True)
class Entry:
    """One (setting, target epsilon, method, seed) of the table: the run and model that give it.

    ``run`` is None (and ``note`` says why) when the setting cannot protect the method's merge.
    """

    setting: str
    epsilon: float
    method: str
    seed: int
    run: Run | None
    model: str
    note: str = ""


@dataclass(frozen=True)
class Grid:
    """The planned ablation: every run, in order, and every entry of the table."""

    runs: list[Run]
    entries: list[Entry]
    domains: list[str]
    settings: list[str]
    methods: list[str]


def run_name(setting: str, epsilon: float, method: str, seed: int) -> str:
    """The run directory's name: ``<setting>-eps<E>-<method>-seed<S>``."""
    return f"{setting}-eps{epsilon_text(epsilon)}-{method}-seed{seed}"


def epsilon_text(epsilon: float) -> str:
    """A target epsilon as written in names and tables: every digit, ``8`` for 8.0, or ``inf``."""
    text = repr(float(epsilon))
    return text.removesuffix(".0")


def check_preset(preset: str) -> None:
    """Refuse a preset that is neither a file nor a name in ``configs/``, naming the key."""
    if Path(preset).is_file() or (CONFIG_DIR / f"{preset}.toml").is_file():
        return
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("simulate*.toml")))
    raise FedmergeError(
        f"preset = {preset!r} is neither a TOML file nor a preset in configs/; set preset to a "
        f"federation preset ({names}) or the path of a federation TOML file"
    )


def plan(config: AblateConfig) -> Grid:
    """Every run and table entry of `config`, each run's federation config validated.

    Raises
    ------
    FedmergeError
        Before any run starts: a missing preset, an unknown domain, a ``learned`` method without
        a learned merge in the preset, or a row whose federation config is refused (named).
    """
    check_preset(config.preset)
    base = load_config(
        config.preset, [*config.set, *_privacy_keys(NON_PRIVATE, math.inf)], FederationConfig
    )
    domains = config.domains if config.domains is not None else base.domains
    if not domains:
        raise FedmergeError(
            f"domains is empty and preset {config.preset!r} names none; set domains, e.g. "
            'domains = ["pantry", "toys"]'
        )
    for name in domains:
        check_domain_name(name)
    if "learned" in config.methods and base.merge.learn.mode == "none":
        raise FedmergeError(
            f"methods lists 'learned' but preset {config.preset!r} learns no merge "
            "(merge.learn.mode = none); add e.g. 'merge.learn.mode=task-wise' to set, or drop "
            "'learned' from methods"
        )
    runs: dict[str, Run] = {}
    entries = []
    for seed in config.seeds:
        cells = [(NON_PRIVATE, math.inf)] + [
            (s, e) for s in config.settings for e in config.epsilons
        ]
        for setting, epsilon in cells:
            entries += _cell(config, base, domains, setting, epsilon, seed, runs)
    return Grid(list(runs.values()), entries, list(domains), list(config.settings), config.methods)


def _cell(
    config: AblateConfig,
    base: FederationConfig,
    domains: list[str],
    setting: str,
    epsilon: float,
    seed: int,
    runs: dict[str, Run],
) -> list[Entry]:
    """The entries of one (setting, epsilon, seed) for every method; new runs go into `runs`."""
    possible: dict[str, FederationConfig] = {}
    notes: dict[str, str] = {}
    for method in config.methods:
        note = _impossible(config, base, domains, setting, epsilon, method, seed)
        if note:
            notes[method] = note
            continue
        name = run_name(setting, epsilon, method, seed)
        try:
            possible[method] = load_config(
                config.preset,
                _row_keys(config, base, domains, setting, epsilon, method, seed),
                FederationConfig,
            )
        except FedmergeError as err:
            raise FedmergeError(f"row {name}: {err}") from err
    entries = []
    for method in config.methods:
        if method in notes:
            entries.append(Entry(setting, epsilon, method, seed, None, "", notes[method]))
            continue
        shared = "learned" if method == "ties" and "learned" in possible else method
        name = run_name(setting, epsilon, shared, seed)
        run = runs.setdefault(name, Run(name, possible[shared]))
        entries.append(Entry(setting, epsilon, method, seed, run, model_label(method, run.config)))
    return entries


def _impossible(
    config: AblateConfig,
    base: FederationConfig,
    domains: list[str],
    setting: str,
    epsilon: float,
    method: str,
    seed: int,
) -> str:
    """Why `setting` cannot protect `method`'s merge ("" when it can)."""
    if setting == NON_PRIVATE:
        return ""
    keys = _row_keys(config, base, domains, NON_PRIVATE, math.inf, method, seed)
    merge = load_config(config.preset, keys, FederationConfig)
    mechanism = build_mechanism(PrivacyConfig(mechanism=setting, epsilon=epsilon), 1, seed)
    try:
        mechanism.check(
            merge.merge.method,
            merge.merge.learn.mode,
            merge.merge.rows,
            merge.parties_per_domain,
        )
    except FedmergeError as err:
        if mechanism.central:
            return f"not possible: {setting} noises only a plain mean"
        return f"not possible: {err}"
    return ""


def _row_keys(
    config: AblateConfig,
    base: FederationConfig,
    domains: list[str],
    setting: str,
    epsilon: float,
    method: str,
    seed: int,
) -> list[str]:
    """The overrides of one row, after the ablation's ``set``: domains, seed, merge, privacy."""
    method_name = "average" if method == "average" else "ties"
    keys = [
        *config.set,
        f"domains={json.dumps(domains)}",
        f"seed={seed}",
        f"train.seed={seed}",
        *METHOD_KEYS[method],
    ]
    if base.merge.method != method_name:
        keys.append("merge.params={}")  # the preset's parameters belong to its own method
    return [*keys, *_privacy_keys(setting, epsilon)]


def _privacy_keys(setting: str, epsilon: float) -> list[str]:
    """The privacy keys of a row.

    A private row sets the mechanism and its target epsilon (the preset's and ``set``'s other
    privacy keys stay); a non-private row gets the default privacy table as a whole.
    """
    if setting == NON_PRIVATE:
        return [f"privacy={json.dumps({'mechanism': NON_PRIVATE})}"]
    return [f"privacy.mechanism={json.dumps(setting)}", f"privacy.epsilon={epsilon!r}"]


def model_label(method: str, config: FederationConfig) -> str:
    """The model in a run's ``metrics.json`` that stands for `method`."""
    learn = config.merge.learn
    if method == "learned":
        return f"merged ({learn.mode}, {learn.loss})"
    return f"{config.merge.method} (training-free)"
