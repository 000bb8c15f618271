"""Live progress (rich) for pre-training, fine-tuning, merging, SAR and evaluation, on stderr.

On a terminal: live bars. Otherwise (a log file or a pipe): plain timestamped lines, one per message
and one per phase that took a while, never rich's redrawn bars or its source-file tags. A grid's
overall bar (``overall``) hosts every run's bars in the same live display."""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, Optional, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .console import log_line, make_console

console = make_console(stderr=True)
T = TypeVar("T")

#: phases at least this long get a line of their own in a log (shorter ones would flood it)
LOG_PHASE_S = 2.0

_shared: Optional[Progress] = None  # the live display of an enclosing ``overall`` bar, if any
_current: Optional["Reporter"] = None  # the innermost active reporter (per-batch bars join it)


def _columns(eta_label: bool = False):
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            *((TextColumn("ETA"),) if eta_label else ()), TimeRemainingColumn())


class Reporter:
    """A thin wrapper so that code can report progress whether or not a display is attached."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._outer: Optional["Reporter"] = None
        self._progress: Optional[Progress] = None
        self._owns = False
        self._live = enabled and console.is_terminal

    def __enter__(self) -> "Reporter":
        global _current
        self._outer, _current = _current, self
        if self._live:
            if _shared is not None:  # inside a grid's overall bar: add to its display
                self._progress = _shared
            else:
                self._progress = Progress(*_columns(), console=console, transient=True)
                self._progress.start()
                self._owns = True
        return self

    def __exit__(self, *exc) -> None:
        global _current
        if self._progress is not None and self._owns:
            self._progress.stop()
        self._progress, self._owns = None, False
        _current = self._outer

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int]) -> Iterator["_Bar"]:
        """A bar for one phase (``total=None``: a phase without a count, e.g. a merge)."""
        if self._progress is None:
            bar = _Bar(None, None)
            t0 = time.perf_counter()
            yield bar
            seconds = time.perf_counter() - t0
            if self.enabled and seconds >= LOG_PHASE_S:
                count = f" ({bar.completed}/{total})" if total else ""
                log_line(console, f"{description}{count}: {seconds:.1f} s" + (f", {bar.info}" if bar.info else ""))
            return
        task_id = self._progress.add_task(description, total=total, info="")
        try:
            yield _Bar(self._progress, task_id)
        finally:
            self._progress.remove_task(task_id)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        elif self.enabled:
            log_line(console, message)


class _Bar:
    def __init__(self, progress: Optional[Progress], task_id):
        self._progress, self._task_id = progress, task_id
        self.completed, self.info = 0, ""

    def update(self, completed: int, info: str = "") -> None:
        self.completed, self.info = completed, info
        if self._progress is not None:
            self._progress.update(self._task_id, completed=completed, info=info)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self._progress is not None:
            self._progress.advance(self._task_id, n)

    def skip(self, n: int = 1) -> None:
        """Count ``n`` items done without work (e.g. a run finished earlier)."""
        _Bar.advance(self, n)


def batches(iterable: Iterable[T], total: Optional[int], description: str = "evaluate batches") -> Iterator[T]:
    """``iterable``, with a per-batch bar in the active reporter's live display (a terminal only; a
    log gets the enclosing phase's line, not one per batch). Adapters wrap their evaluation loops in it."""
    reporter = _current
    if reporter is None or reporter._progress is None:
        yield from iterable
        return
    with reporter.task(description, total=total) as bar:
        for item in iterable:
            yield item
            bar.advance()


@contextlib.contextmanager
def overall(description: str, total: int, enabled: bool = True) -> Iterator["_Bar"]:
    """A grid's bar over its runs, with ETA, that every run's own bars join (one live display).
    Off a terminal: a timestamped line per advance instead."""
    global _shared
    if not (enabled and console.is_terminal) or _shared is not None:
        yield _LogBar(description, total, enabled)
        return
    progress = Progress(*_columns(eta_label=True), console=console)
    task_id = progress.add_task(description, total=total, info="")
    progress.start()
    _shared = progress
    try:
        yield _Bar(progress, task_id)
    finally:
        _shared = None
        progress.stop()


class _LogBar(_Bar):
    """``overall`` off a terminal: each advance is one line with the elapsed time and an ETA."""

    def __init__(self, description: str, total: int, enabled: bool):
        super().__init__(None, None)
        self.description, self.total, self.enabled = description, total, enabled
        self._t0 = time.perf_counter()
        self._skipped = 0

    def skip(self, n: int = 1) -> None:
        self.completed += n
        self._skipped += n

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        worked = self.completed - self._skipped  # the ETA extrapolates from runs that did work
        eta = elapsed / worked * (self.total - self.completed) if worked else 0.0
        log_line(console, f"{self.description}: {self.completed}/{self.total} done, {elapsed:.0f} s elapsed, "
                          f"ETA {eta:.0f} s")
