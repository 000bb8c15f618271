"""Grids of runs: a TOML grid file (``spec``), the plan of which runs share experts (``plan``), the
executors behind one ``GridOutcome`` (``local``: in order in this process or over worker processes;
``ray_executor``: on a Ray cluster), and the leaderboard from the result files alone
(``aggregate``, ``selection``, ``reference``, ``formatting``). ``cl-merge leaderboard`` and
``cl-merge demo`` are grid runs; the file format is in ``cl_merge.leaderboard``'s doc and docs/.
"""

from .outcome import GridOutcome
from .spec import Grid, GridEntry, expand, load_grid, parse_grid

__all__ = ["Grid", "GridEntry", "GridOutcome", "expand", "load_grid", "parse_grid"]
