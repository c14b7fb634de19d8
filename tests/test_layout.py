"""The layout keeps its promises.

One import direction, and generic code that names no model family.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS: list[tuple[str, ...]] = [
    ("fedmerge", "fedmerge.errors", "fedmerge.config", "fedmerge.files", "fedmerge.progress"),
    ("fedmerge.data",),
    ("fedmerge.text",),
    ("fedmerge.models",),
    ("fedmerge.privacy",),
    ("fedmerge.evaluate",),
    ("fedmerge.train",),
    ("fedmerge.merge",),
    ("fedmerge.runs",),
    ("fedmerge.train.run", "fedmerge.merge.run"),  # the workflows, above the library layers
    ("fedmerge.weaving",),  # woven adapters' roles and schedule, over training in legs
    ("fedmerge.protocol",),
    ("fedmerge.pipeline", "fedmerge.woven"),
    ("fedmerge.ablate",),
    ("clients", "server"),  # the Flower apps, over the pipeline
    ("fedmerge.cli", "fedmerge.__main__"),  # the command line starts either backend
]
"""Lowest first: a module may import its own layer and those below, never one above."""
GENERIC = [
    "fedmerge/protocol.py",
    "fedmerge/weaving.py",
    "fedmerge/woven.py",
    "fedmerge/pipeline.py",
    "fedmerge/privacy",
    "fedmerge/merge",
    "fedmerge/train",
    "fedmerge/evaluate",
    "fedmerge/runs",
    "clients",
    "server",
]
FAMILY_NAMES = re.compile(r"TextSeqRec|TextEncRec|textseq|textenc|text_weight")


def layer(module: str) -> int:
    """The layer of `module`: that of its longest listed prefix."""
    best = max(
        (
            prefix
            for names in LAYERS
            for prefix in names
            if module == prefix or module.startswith(prefix + ".")
        ),
        key=len,
    )
    return next(i for i, names in enumerate(LAYERS) if best in names)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file.

    Function-level imports count too.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in {"fedmerge", "clients", "server"}}


def sources() -> list[Path]:
    return sorted(
        p for folder in ("fedmerge", "clients", "server") for p in (ROOT / folder).rglob("*.py")
    )


def test_every_import_points_down_the_layers() -> None:
    upward = [
        f"{module_name(path)} (layer {layer(module_name(path))}) imports {name} (layer "
        f"{layer(name)})"
        for path in sources()
        for name in imports(path)
        if layer(name) > layer(module_name(path))
    ]
    assert not upward, "\n".join(upward)


def test_the_layer_check_catches_an_upward_import() -> None:
    assert (
        layer("fedmerge.train.loop") < layer("fedmerge.merge.learn") < layer("fedmerge.train.run")
    )
    assert layer("fedmerge.models.textseq") < layer("fedmerge.train.loop")
    # a package's modules are in its layer
    assert layer("fedmerge.pipeline") < layer("fedmerge.ablate.run") == layer("fedmerge.ablate")


def test_generic_code_names_no_model_family() -> None:
    files = [
        p
        for entry in GENERIC
        for p in ([ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py"))
    ]
    assert len(files) > 20
    named = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FAMILY_NAMES.search(line)
    ]
    assert not named, "\n".join(named)
