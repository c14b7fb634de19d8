"""Progress bars for long work: on stderr, shown only on a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def progress_bar(*columns: str | ProgressColumn, quiet: bool = False) -> Progress:
    """A transient rich progress bar on stderr; disabled when `quiet` or when stderr is not a terminal."""
    console = Console(stderr=True)
    return Progress(*columns, console=console, disable=quiet or not console.is_terminal, transient=True)
