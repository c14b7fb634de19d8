"""The docs: generated pages are current, relative links resolve, Quick start commands exist."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
LINKED = ["README.md", "benchmarks/README.md", "configs/README.md"]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fedmerge_docs_generate", ROOT / "docs" / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_current(capsys) -> None:
    generate = _generator()
    files = generate.render()
    stale = [str(path.relative_to(ROOT)) for path in generate.stale(files)]
    assert not stale, (
        f"{', '.join(stale)} out of date with the code or configs/: run `make docs` (python "
        "docs/generate.py)"
    )
    assert generate.main(["--check"]) == 0  # the --check mode agrees
    capsys.readouterr()


def test_generator_check_names_a_stale_file(tmp_path: Path, capsys, monkeypatch) -> None:
    generate = _generator()
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    monkeypatch.setattr(generate, "render", lambda: {tmp_path / "docs" / "cli.md": "new\n"})
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cli.md").write_text("old\n")
    assert generate.main(["--check"]) == 1
    assert "docs/cli.md is stale: run `make docs`" in capsys.readouterr().err
    assert (tmp_path / "docs" / "cli.md").read_text() == "old\n"  # --check writes nothing


def test_config_doc_lists_every_key_and_preset() -> None:
    from fedmerge.merge.methods import METHODS
    from fedmerge.models import FAMILIES
    from fedmerge.protocol import FederationConfig
    from fedmerge.train.config import ExperimentConfig

    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")

    def keys(model, prefix: str = ""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from keys(annotation, f"{prefix}{name}.")
            else:
                yield prefix + name

    # `model`: the keys every family has
    expected = [*keys(ExperimentConfig), *keys(FederationConfig)]
    expected += [
        f"model.{k}"
        for cls in FAMILIES.values()
        if cls.__module__.startswith("fedmerge.")
        # and each built-in family's own (not one a test registers)
        for k in cls.Config.model_fields
    ]
    expected += [
        f"merge.params.{k}" for method in METHODS.values() for k in method.params.model_fields
    ]
    missing = [k for k in expected if f"| `{k}` |" not in text]
    assert not missing, f"docs/config.md lacks {missing}: run `make docs`"
    for path in sorted((ROOT / "configs").glob("*.toml")):
        assert f"### `configs/{path.name}`" in text, (
            f"docs/config.md lacks the preset {path.name}: run `make docs`"
        )


def _without_code(text: str) -> str:
    """`text` with fenced code blocks and inline code blanked out.

    Same length, same line breaks.
    """
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    text = re.sub(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", blank, text, flags=re.M | re.S)
    # not across paragraphs
    return re.sub(r"(`+)(?!`)(?:(?!\n[ \t]*\n).)*?(?<!`)\1(?!`)", blank, text, flags=re.S)


_LINK = re.compile(
    # [text](target "title")
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)"
    r"|^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)"  # [ref]: target
    r"|<a\s[^>]*?href\s*=\s*[\"']([^\"']+)[\"']",
    re.M | re.I,
)


def markdown_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link in a Markdown file, outside code."""
    text = _without_code(path.read_text(encoding="utf-8"))
    return [
        (text.count("\n", 0, m.start()) + 1, next(g for g in m.groups() if g))
        for m in _LINK.finditer(text)
    ]


def _markdown_files() -> list[Path]:
    files = [ROOT / name for name in LINKED] + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def test_relative_links_resolve() -> None:
    from urllib.parse import unquote

    broken = []
    checked = 0
    for path in _markdown_files():
        for line, target in markdown_links(path):
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith(("#", "//")):
                continue  # http(s), mailto, ...; an anchor in the same page
            file = unquote(target.split("#", 1)[0].split("?", 1)[0])
            resolved = ROOT / file.lstrip("/") if file.startswith("/") else path.parent / file
            checked += 1
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert checked, "no relative link found: the link pattern is broken"
    assert not broken, "broken relative links (file:line: target):\n" + "\n".join(broken)


def test_link_finder(tmp_path: Path) -> None:
    sample = tmp_path / "sample.md"
    text = (
        'See [a](docs/a.md#x) and ![img](p.png "t").\n```\n[no](code.md)\n```\n`[no](inline.md)` '
        '[b]: other.md\n[c]: ref.md\n<a href="html.md">h</a> [web](https://x.org) [[n]](n.md)\n'
    )
    sample.write_text(text)
    assert markdown_links(sample) == [
        (1, "docs/a.md#x"),
        (1, "p.png"),
        (6, "ref.md"),
        (7, "html.md"),
        (7, "https://x.org"),
        (7, "n.md"),
    ]


def _quick_start(readme: Path) -> list[tuple[int, str]]:
    """(line, command) of every command in the code blocks of the README's "Quick start" section."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"#+\s+Quick start\s*$", line, re.I))
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    commands, fenced = [], False
    for number, line in enumerate(lines[start + 1 :], start + 2):
        if not fenced and re.match(rf"#{{1,{level}}}\s", line):
            break
        if re.match(r"\s*(```|~~~)", line):
            fenced = not fenced
        elif fenced and line.strip() and not line.lstrip().startswith("#"):
            commands.append((number, line.strip()))
    return commands


def _words(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value make ...
        words.pop(0)
    return words


def quick_start_problems(readme: Path, makefile: Path) -> tuple[int, list[str]]:
    """How many Quick start commands were checked, and each problem.

    A `make` target missing, a `fedmerge` command that does not parse (unknown command or option:
    its ``--help`` does not exit 0).
    """
    from fedmerge.cli import app

    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile.read_text(), re.M))
    runner = CliRunner()
    checked, problems = 0, []
    for line, command in _quick_start(readme):
        words = _words(command)
        if not words:
            continue
        program, args = Path(words[0]).name, words[1:]
        if program == "make":
            for target in (a for a in args if not a.startswith("-") and "=" not in a):
                checked += 1
                if target not in targets:
                    problems.append(
                        f"{readme.name}:{line}: `{command}`: no target {target!r} in the Makefile"
                    )
        elif program == "fedmerge":
            checked += 1
            result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
            if result.exit_code != 0:
                said = " ".join(
                    " ".join(result.output.translate(_BOX).split()).split("Error ")[-1:]
                )
                problems.append(
                    f"{readme.name}:{line}: `{command}` does not parse (exit {result.exit_code}): "
                    f"{said}"
                )
    return checked, problems


_BOX = str.maketrans({c: " " for c in "│╭╮╰╯─"})


def test_quick_start_commands_exist() -> None:
    checked, problems = quick_start_problems(ROOT / "README.md", ROOT / "Makefile")
    assert checked, "no `make` or `fedmerge` command found in README.md's Quick start code blocks"
    assert not problems, "README.md's Quick start:\n" + "\n".join(problems)


def test_quick_start_checker(tmp_path: Path) -> None:
    readme, makefile = tmp_path / "README.md", tmp_path / "Makefile"
    makefile.write_text("X := 1\n.PHONY: run\nrun: install\n\techo\ninstall:\n")
    readme.write_text(
        "# t\n\n## Quick start\n\n```bash\n# a comment\nmake run   # go\nA=1 make "
        "install\nfedmerge simulate --domains books,movies\nfedmerge simulate --domain books\nmake "
        "demo\n```\n\n## Next\n\n```bash\nmake elsewhere\n```\n"
    )
    checked, problems = quick_start_problems(readme, makefile)
    assert checked == 5
    assert (
        len(problems) == 2
        and "README.md:10: `fedmerge simulate --domain books` does not parse (exit 2)"
        in problems[0]
    )
    assert (
        "--domain" in problems[0]
        and problems[1] == "README.md:11: `make demo`: no target 'demo' in the Makefile"
    )
