"""The ablation's folder: its default place, making it, and which of its runs are complete."""

from __future__ import annotations

import json
from pathlib import Path

from fedmerge.ablate.config import AblateConfig
from fedmerge.errors import FedmergeError
from fedmerge.files import write_json
from fedmerge.protocol import FederationConfig
from fedmerge.runs.outdir import read_record

CACHE = "training-cache"
"""The folder of the kept local trainings, in the ablation's folder."""
RECORD = "ablation.json"
"""The record that marks a folder as an ablation's (its command and config)."""


def default_out(config: str) -> Path:
    """``runs/ablate-<config stem>`` (``runs/<stem>`` when the stem already starts so)."""
    stem = Path(config).stem
    return Path("runs") / (stem if stem.startswith("ablate-") else f"ablate-{stem}")


def prepare_out(out: Path, config: AblateConfig) -> None:
    """Make `out`, refusing a file or a non-empty folder that holds no ablation."""
    if out.exists() and not out.is_dir():
        raise FedmergeError(f"--out {out} is a file; give a folder for the ablation")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise FedmergeError(
            f"--out {out} is not empty and holds no ablation ({RECORD}); give a new or empty "
            "folder, or the --out of an earlier `fedmerge ablate` to resume it"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RECORD, {"command": "ablate", "config": config.model_dump(mode="json")})


def complete(folder: Path, config: FederationConfig) -> bool:
    """Whether `folder` holds a complete run of `config` (an interrupted one never counts)."""
    record = read_record(folder)
    if record is None or record.get("status") != "complete":
        return False
    if not (folder / "metrics.json").is_file():
        return False
    try:
        stored = json.loads((folder / "config.json").read_text())["federation"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(stored == json.loads(json.dumps(config.model_dump())))
