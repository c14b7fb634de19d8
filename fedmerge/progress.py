"""Progress for long work: rich bars on a terminal, plain lines off one.

The plain lines say a quarter of the way, half, ...

Outside a run, :func:`progress_bar` draws a transient bar on stderr (plain lines off a terminal).
While a run's console is attached (:func:`attach`, done by :class:`fedmerge.runs.rundir.RunScreen`),
bars go to that console instead, so they share the screen with the run's lines; off a terminal they
become a few plain lines (a quarter of the way, half, three quarters, done), and :class:`Status` is
the one-line spinner of a phase that waits (a terminal only).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class Status:
    """The phase a run is waiting in, with its elapsed time.

    A transient spinner line on a terminal, nothing off one.

    ``show`` starts it or changes its text (``restart``: the clock starts again, for a new phase);
    ``stop`` clears it, so a progress bar can take the screen.
    """

    def __init__(self, console: Console) -> None:
        self.console, self.enabled = console, console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._lock = threading.Lock()

    def show(self, text: str, restart: bool = False) -> None:
        """Show `text` with the elapsed time; `restart` starts the clock again."""
        if not self.enabled:
            return
        with self._lock:
            if self._progress is not None and restart:
                self._stop()
            if self._progress is None:
                self._progress = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}", markup=False),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                )
                self._task = self._progress.add_task(text, total=None)
                self._progress.start()
            else:
                assert self._task is not None  # added with the progress
                self._progress.update(self._task, description=text)

    def stop(self) -> None:
        """Clear the spinner line."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._task = None, None


class _Lines(Progress):
    """A progress that draws nothing and prints a plain line at each quarter of a task.

    Used off a terminal.
    """

    def __init__(self, *columns: str | ProgressColumn, line: Callable[[str], None]) -> None:
        super().__init__(*columns, disable=True)
        self._line = line
        self._shown: dict[TaskID, int] = {}  # task -> quarters printed

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if not task.total:
            return
        quarter = min(4, int(4 * task.completed // task.total))
        if quarter < self._shown.get(task_id, 0):  # the task started over (a new epoch)
            self._shown[task_id] = 0
        if quarter > self._shown.get(task_id, 0):
            self._shown[task_id] = quarter
            words = [
                column.render(task).plain
                for column in self.columns
                # the line's time is the elapsed time
                if isinstance(column, TextColumn | MofNCompleteColumn)
            ]
            self._line("  " + " ".join(w.strip() for w in words if w.strip()))


_attached: tuple[Console, Callable[[str], None], Status] | None = None
"""The console of the run in progress, how it prints one plain line, and its status.

See :func:`attach`.
"""


def attach(console: Console, line: Callable[[str], None], status: Status) -> None:
    """Route every progress bar to `console` until :func:`detach`.

    Off a terminal: quarter lines through `line`.
    """
    global _attached
    _attached = (console, line, status)


def detach() -> None:
    """Progress bars go back to stderr (see :func:`attach`)."""
    global _attached
    _attached = None


def progress_bar(*columns: str | ProgressColumn, quiet: bool = False) -> Progress:
    """A transient rich progress bar; disabled when `quiet`.

    Outside a run: on stderr (off a terminal, plain lines there). During a run (:func:`attach`):
    on the run's console, taking the place of its status line; off a terminal, plain lines.
    """
    if _attached is None:
        console = Console(stderr=True)
        if quiet or console.is_terminal:
            return Progress(*columns, console=console, disable=quiet, transient=True)
        plain = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
        return _Lines(*columns, line=plain.print)
    console, line, status = _attached
    if quiet or not console.is_terminal:
        return Progress(*columns, disable=True) if quiet else _Lines(*columns, line=line)
    status.stop()  # one live display at a time
    return Progress(*columns, console=console, transient=True)
