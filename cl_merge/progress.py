"""Live progress (rich) for pre-training, fine-tuning and evaluation, on stderr."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class Reporter:
    """A thin wrapper so that code can report progress whether or not a display is attached."""

    def __init__(self, enabled: bool = True):
        self._progress: Optional[Progress] = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=True,
            )

    def __enter__(self) -> "Reporter":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator["_Bar"]:
        if self._progress is None:
            yield _Bar(None, None)
            return
        task_id = self._progress.add_task(description, total=total, info="")
        try:
            yield _Bar(self._progress, task_id)
        finally:
            self._progress.remove_task(task_id)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.log(message)


class _Bar:
    def __init__(self, progress: Optional[Progress], task_id):
        self._progress, self._task_id = progress, task_id

    def update(self, completed: int, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, completed=completed, info=info)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id, n)
