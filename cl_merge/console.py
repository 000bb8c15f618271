"""The consoles every command prints through (``make_console``): rich on a terminal, and when the
output is a file or a pipe (a log), a console wide enough that no table cell, name or number is ever
cut, rules as short plain lines, and no live display."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from rich.console import Console

#: the width a non-terminal console lays tables out in: wide enough for any table to take its natural
#: width, so a log file never shows "76…" (CL_MERGE_LOG_WIDTH overrides it)
LOG_WIDTH = 4000


def log_width() -> int:
    value = os.environ.get("CL_MERGE_LOG_WIDTH", "")
    return int(value) if value.isdigit() and int(value) > 0 else LOG_WIDTH


class LogConsole(Console):
    """A rich console that lays out at ``log_width()`` when it does not write to a terminal.

    The terminal check runs at every print (the stream can be swapped, e.g. by a test's capture). An
    explicit ``width=`` wins; the COLUMNS variable only applies on a terminal (it describes one)."""

    def __init__(self, *args, **kwargs):
        self._explicit_width = kwargs.get("width") is not None
        super().__init__(*args, **kwargs)

    @property
    def size(self):  # type: ignore[override]
        dimensions = Console.size.fget(self)  # type: ignore[attr-defined]
        if self.is_terminal or self._explicit_width:
            return dimensions
        return dimensions._replace(width=log_width())

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def rule(self, title: Any = "", **kwargs) -> None:
        if self.is_terminal:
            super().rule(title, **kwargs)
        else:  # a log gets a short separator, not a line thousands of characters wide
            self.print(f"── {title} ──" if title else "─" * 40, highlight=False)


def make_console(stderr: bool = False) -> LogConsole:
    """A console on stdout (or stderr); see ``LogConsole``."""
    return LogConsole(stderr=stderr)


def stamp() -> str:
    """The timestamp of a plain log line (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log_line(console: Console, message: str) -> None:
    """One plain, timestamped line (no rich markup, no source-file tag)."""
    console.print(f"{stamp()} {message}", markup=False, highlight=False, soft_wrap=True)


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())
