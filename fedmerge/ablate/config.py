"""The keys of an ablation (:class:`AblateConfig`) and their checks, and the grid's vocabulary."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from fedmerge.config import ConfigModel
from fedmerge.errors import FedmergeError
from fedmerge.privacy.base import MECHANISMS

NON_PRIVATE = "none"
"""The setting of the non-private rows (always run; target epsilon ``inf``)."""
METHOD_KEYS: dict[str, list[str]] = {
    "average": ["merge.method=average", "merge.learn.mode=none", "merge.rows=method"],
    "ties": ["merge.method=ties", "merge.learn.mode=none"],
    "learned": ["merge.method=ties"],
}
"""The merge keys of each method; ``learned`` keeps the preset's learned merge."""
GRID_KEYS = (
    "domains",
    "seed",
    "train.seed",
    "privacy.mechanism",
    "privacy.epsilon",
    "privacy.noise_multiplier",
    "merge.method",
)
"""Keys the grid sets on every row: ``set`` may not give them."""


class AblateConfig(ConfigModel):
    """A privacy ablation: the grid of settings, target epsilons, merge methods and seeds."""

    preset: str = Field(
        "simulate",
        description="the federation preset every row starts from (configs/NAME.toml or a path)",
    )
    domains: list[str] | None = Field(
        None, description="the federation's domains (default: the preset's)"
    )
    settings: list[str] = Field(
        default_factory=lambda: ["dpsgd", "update-dp", "central-dp"],
        description="privacy mechanisms; the non-private rows (epsilon inf) are always run",
    )
    epsilons: list[float] = Field(
        default_factory=lambda: [8.0, 4.0, 1.0],
        description="target epsilons per party for the whole run",
    )
    methods: list[str] = Field(
        default_factory=lambda: list(METHOD_KEYS),
        description="merge methods: average, ties (training-free) and learned (the preset's "
        "learned merge from ties)",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], description="seeds (seed and train.seed) of every row"
    )
    set: list[str] = Field(
        default_factory=list, description="key=value overrides applied to every row"
    )

    @field_validator("domains")
    @classmethod
    def _some_domains(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            _nonempty("domains", value, '["pantry", "toys"]')
            _once("domains", value)
        return value

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: list[str]) -> list[str]:
        _nonempty("settings", value, '["update-dp"] (the non-private rows are always run)')
        private = [name for name, cls_ in MECHANISMS.items() if cls_.spends]
        for name in value:
            if name == NON_PRIVATE:
                raise FedmergeError(
                    "settings lists 'none'; the non-private rows are always run, so drop it "
                    f"(settings are the privacy mechanisms: {', '.join(private)})"
                )
            if name not in private:
                raise FedmergeError(
                    f"settings lists {name!r}, which is no privacy mechanism that spends an "
                    f"epsilon; use some of: {', '.join(private)}"
                )
        _once("settings", value)
        return value

    @field_validator("epsilons")
    @classmethod
    def _positive_epsilons(cls, value: list[float]) -> list[float]:
        _nonempty("epsilons", value, "[8.0, 1.0]")
        for epsilon in value:
            if epsilon <= 0.0:
                raise FedmergeError(
                    f"epsilons lists {epsilon:g}; each target epsilon must be > 0 (the "
                    "non-private rows, epsilon inf, are always run), e.g. epsilons = [8.0, 1.0]"
                )
        _once("epsilons", value)
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        _nonempty("methods", value, '["average", "ties", "learned"]')
        for name in value:
            if name not in METHOD_KEYS:
                raise FedmergeError(
                    f"methods lists {name!r}, which is no merge method of the ablation; use "
                    f"some of: {', '.join(METHOD_KEYS)}"
                )
        _once("methods", value)
        return value

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, value: list[int]) -> list[int]:
        _nonempty("seeds", value, "[0, 1]")
        _once("seeds", value)
        return value

    @model_validator(mode="after")
    def _free_keys(self) -> AblateConfig:
        for item in self.set:
            key = item.partition("=")[0].strip()
            if key in GRID_KEYS or key == "privacy":
                raise FedmergeError(
                    f"set gives {key!r}, which the grid sets on every row; use the ablation's "
                    "domains, seeds, settings, epsilons and methods instead, and drop it from set"
                )
        return self


def _nonempty(key: str, value: list, example: str) -> None:
    if not value:
        raise FedmergeError(f"{key} is empty; list at least one, e.g. {key} = {example}")


def _once(key: str, value: list) -> None:
    twice = [v for i, v in enumerate(value) if v in value[:i]]
    if twice:
        raise FedmergeError(f"{key} lists {twice[0]!r} twice; give each once")
