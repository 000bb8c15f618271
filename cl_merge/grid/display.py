"""Live progress of a grid on Ray (rich, on stderr): runs done / running / failed, experts, elapsed,
ETA. Without a display (``--quiet``), one line per finished run."""

from __future__ import annotations


class GridDisplay:
    """Progress of the Ray executor (module doc)."""

    def __init__(self, total: int, experts: int, enabled: bool, console):
        self.total, self.experts, self.console = total, experts, console
        self._progress = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            from ..progress import console as stderr

            self._progress = Progress(TextColumn("[bold]grid on Ray"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), console=stderr)
            self._task = self._progress.add_task("grid", total=total, info=self._info(0, 0, 0, 0))

    def _info(self, done: int, running: int, failed: int, experts_done: int) -> str:
        text = f"done {done - failed} · running {running} · failed {failed}"
        return text + (f" · experts {experts_done}/{self.experts}" if self.experts else "")

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def update(self, finished: int, running: int, failed: int, experts_done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=finished,
                                  info=self._info(finished, running, failed, experts_done))

    def line(self, text: str) -> None:
        target = self._progress.console if self._progress is not None else self.console
        if target is not None:
            target.print(text, highlight=False)
