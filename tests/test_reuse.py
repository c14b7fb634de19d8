"""Reused and exchanged run folders, as careless users and attackers would hand them over.

A finished run survives any failing rerun byte for byte; a foreign folder is never touched; a
resume file cannot run code; a run resumes only with the inputs it started with; every bad
input ends in one plain line on stderr (exit 2), printed as text, never as markup.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedmerge.train.loop as loop
from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.train.run import train_run
from tests.test_train import TINY, tiny

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``fedmerge ARGS`` through the entry point in this process: (exit code, stderr)."""
    argv = sys.argv
    sys.argv = ["fedmerge", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


class Marker:
    """A pickle that writes a file when it is unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.path, "code ran"))


def interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Ctrl-C at the `calls`-th validation.

    Call 1 scores the start; call e + 1 ends epoch e, after its state is saved only from the next
    epoch on.
    """
    real, seen = loop.validation_score, []

    def score(*args: object, **kwargs: object) -> float:
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validation_score", score)


def test_a_finished_train_run_survives_every_failing_rerun_byte_for_byte(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train_run(["synth-0"], tiny("train.epochs=1"), out, quiet=True)
    finished = snapshot(out)
    assert (
        json.loads(finished["run.json"])["status"] == "complete" and "trainer.json" not in finished
    )
    sets = [a for s in TINY for a in ("--set", s)]
    for args in (
        ["--domain", "nosuch"],
        ["--domain", "synth-0", "--set", "train.lr=inf"],
        ["--domain", "synth-0", "--set", "model.dim=30", "--set", "model.heads=4"],
        ["--domain", "synth-0", "--init", str(tmp_path / "missing")],
    ):
        code, err = cli(capsys, "train", "--out", str(out), "--quiet", *sets, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert snapshot(out) == finished and not (tmp_path / "run.partial").exists()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("training broke before its first epoch ended")

    monkeypatch.setattr("fedmerge.train.run.fit", broken)
    with pytest.raises(RuntimeError, match="broke"):
        train_run(["synth-0"], tiny("train.epochs=1"), out, quiet=True)
    assert snapshot(out) == finished and not (tmp_path / "run.partial").exists()


def test_a_foreign_or_other_command_folder_is_never_touched(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("my own numbers")
    sets = [a for s in TINY for a in ("--set", s)]
    code, err = cli(capsys, "train", "--domain", "synth-0", "--out", str(mine), "--quiet", *sets)
    assert code == 2 and "is not empty and was not written by fedmerge" in err
    assert (mine / "metrics.json").read_text() == "my own numbers"
    code, err = cli(
        capsys, "evaluate", "--domain", "synth-0", "--baseline", "popularity", "--out", str(mine)
    )
    assert code == 2 and (mine / "metrics.json").read_text() == "my own numbers"
    evaluated = tmp_path / "evaluated"
    assert (
        cli(
            capsys,
            "evaluate",
            "--domain",
            "synth-0",
            "--baseline",
            "popularity",
            "--out",
            str(evaluated),
        )[0]
        == 0
    )
    code, err = cli(
        capsys, "train", "--domain", "synth-0", "--out", str(evaluated), "--quiet", *sets
    )
    assert (
        code == 2 and "holds a `fedmerge evaluate` run, which `fedmerge train` would replace" in err
    )
    afile = tmp_path / "a-file"
    afile.write_text("x")
    code, err = cli(capsys, "train", "--domain", "synth-0", "--out", str(afile), "--quiet", *sets)
    assert code == 2 and f"--out {afile} is a file" in err and afile.read_text() == "x"


def test_an_interrupted_run_resumes_only_with_its_own_inputs(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    interrupt_after(monkeypatch, 4)  # epochs 1 and 2 are saved, Ctrl-C ends epoch 3's validation
    with pytest.raises(KeyboardInterrupt):
        train_run(["synth-0"], tiny("train.epochs=4"), out, quiet=True)
    assert (
        not out.exists()
        and json.loads((partial / "run.json").read_text())["status"] == "interrupted"
    )
    # the resume state, in safetensors + JSON
    assert json.loads((partial / "trainer.json").read_text())
    monkeypatch.undo()
    with pytest.raises(
        FedmergeError,
        match=r"unfinished train run with other inputs \(domains: \[\"synth-1\"\] now, "
        r"\[\"synth-0\"\] before",
    ):
        train_run(["synth-1"], tiny("train.epochs=4"), out, quiet=True)
    with pytest.raises(FedmergeError, match=r"config.train.lr: 0.01 now, 0.003 before"):
        train_run(["synth-0"], tiny("train.epochs=4", "train.lr=1e-2"), out, quiet=True)
    with pytest.raises(FedmergeError, match=r'init: "[0-9a-f]{64}" now, null before'):
        train_run(
            ["synth-0"], tiny("train.epochs=4"), out, init=partial / "base.safetensors", quiet=True
        )
    train_run(["synth-0"], tiny("train.epochs=4"), out, quiet=True)
    epochs = [h["epoch"] for h in json.loads((out / "config.json").read_text())["history"]]
    assert epochs == [0, 1, 2, 3, 4] and not partial.exists()
    assert not {"trainer.json", "trainer.safetensors"} & {p.name for p in out.iterdir()}
    resumed = load_file(str(out / "model.safetensors"))
    train_run(["synth-0"], tiny("train.epochs=4"), tmp_path / "whole", quiet=True)
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert all(torch.allclose(resumed[k], whole[k], atol=1e-6) for k in whole)


def test_a_crafted_resume_file_runs_no_code(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, partial, marker = tmp_path / "run", tmp_path / "run.partial", tmp_path / "marker"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_run(["synth-0"], tiny("train.epochs=3"), out, quiet=True)
    monkeypatch.undo()
    # a pickle where tensors belong, and the old resume file
    for name in ("trainer.safetensors", "trainer.pt"):
        (partial / name).write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(
        FedmergeError,
        match=r"cannot resume from the trainer state in .*; remove .* to start afresh",
    ):
        train_run(["synth-0"], tiny("train.epochs=3"), out, quiet=True)
    assert not marker.exists()


def test_no_code_unpickles_what_a_user_may_receive() -> None:
    """Only the seqrec importer unpickles, and only pinned or explicitly allowed archives.

    See tests/test_importers.py.
    """
    found = []
    for path in [
        *(ROOT / "fedmerge").rglob("*.py"),
        *(ROOT / "server").rglob("*.py"),
        *(ROOT / "clients").rglob("*.py"),
    ]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(
                r"torch\.load\(|pickle\.loads?\(|read_pickle\(|weights_only=False|Unpickler", line
            ):
                found.append(f"{path.relative_to(ROOT)}:{number}")
    assert [f.split(":")[0] for f in found] == ["fedmerge/data/importers/seqrec.py"], found


def test_errors_are_one_line_of_text_naming_the_file(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = tmp_path / "runs [/] [bold]x[/bold]"
    code, err = cli(capsys, "evaluate", "--domain", "synth-0", "--checkpoint", str(odd))
    assert code == 2 and f"{odd} is not a fedmerge checkpoint" in err and err.count("\n") == 1
    code, err = cli(capsys, "train", "--domain", "no[/]such", "--out", str(odd))
    assert code == 2 and "'no[/]such'" in err and not odd.exists()
    checkpoint = tmp_path / "ckpt"
    train_run(["synth-1"], tiny("train.epochs=1"), checkpoint, quiet=True)
    good = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(
        '{"config": {"model": {"dim": "wide"}}, "text_dim": 64}'
    )
    code, err = cli(capsys, "evaluate", "--domain", "synth-1", "--checkpoint", str(checkpoint))
    assert code == 2 and f"{checkpoint / 'config.json'}: config key 'config.model.dim'" in err
    (checkpoint / "config.json").write_text("{not json")
    code, err = cli(capsys, "evaluate", "--domain", "synth-1", "--checkpoint", str(checkpoint))
    assert code == 2 and f"cannot read {checkpoint / 'config.json'} (JSONDecodeError" in err
    (checkpoint / "config.json").write_text(good)
    truncated = tmp_path / "base.safetensors"
    truncated.write_bytes((checkpoint / "base.safetensors").read_bytes()[:100])
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    for base, problem in (
        (truncated, "it is truncated or not safetensors"),
        (fifo, "is not a regular file"),
    ):
        code, err = cli(
            capsys,
            "merge",
            "--base",
            str(base),
            "--models",
            str(checkpoint),
            "--domains",
            "synth-1",
            "--out",
            str(tmp_path / "merged"),
        )
        assert code == 2 and str(base) in err and problem in err, err
    code, err = cli(
        capsys,
        "merge",
        "--base",
        str(truncated),
        "--models",
        "",
        "--domains",
        "synth-1",
        "--out",
        str(tmp_path / "merged"),
    )
    assert code == 2 and "--models is empty" in err

    def full_disk(rows: object, folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "metrics.json"))

    monkeypatch.setattr("fedmerge.cli.write_metrics", full_disk)
    out = tmp_path / "evaluated"
    code, err = cli(
        capsys, "evaluate", "--domain", "synth-0", "--baseline", "popularity", "--out", str(out)
    )
    assert (
        code == 2
        and "metrics.json (No space left on device); check the path" in err
        and err.count("\n") == 1
    )
    assert not out.exists() and not (tmp_path / "evaluated.partial").exists()
