"""The runs a figure or report reads: result files, directories of them, or a grid file (TOML), which
stands for exactly the runs that grid defines (its ``out`` directory may hold other grids' runs too,
e.g. a tuned sweep beside the defaults)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from .errors import UserError


def load_runs(paths: Sequence[os.PathLike]) -> List[Dict[str, Any]]:
    from .results import find_results, load_result

    results: List[Dict[str, Any]] = []
    plain = []
    for path in map(Path, paths):
        if path.suffix.lower() == ".toml":
            results.extend(grid_runs(path))
        else:
            plain.append(path)
    if plain:
        results.extend(load_result(f) for f in find_results(plain))
    return results


def grid_runs(path: Path) -> List[Dict[str, Any]]:
    """The finished runs of a grid file (missing ones are left out; one line says how many)."""
    from . import leaderboard as lb
    from .io import warn

    if not path.is_file():
        raise UserError(f"no such grid file: {path}")
    grid = lb.load_grid(path)
    configs = lb.expand(grid)
    results, missing = lb.collect(configs, grid.out)
    if not results:
        raise UserError(f"none of the {len(configs)} runs of {path} has results under {grid.out}; "
                        f"run `cl-merge leaderboard {path}` first")
    if missing:
        warn(f"{len(missing)} of {len(configs)} runs of {path} have no results yet; left out")
    return results
