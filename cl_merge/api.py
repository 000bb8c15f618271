"""The Python API: run a strategy, load results, build a leaderboard, from a notebook or a script.

    import cl_merge

    result = cl_merge.run(benchmark="mini", strategy="c-ta", overrides={"benchmark.num_tasks": 3})
    result.acc, result.bwt, result.normalized_acc_independent, result.path
    results = cl_merge.load_results("results/runs")
    board = cl_merge.leaderboard("results/leaderboard_mini.toml", report_only=True)
    print(board.markdown)

Everything the ``cl-merge`` command does goes through the same functions (``config.resolve``,
``runner.execute``, ``cl_merge.grid``); errors are ``cl_merge.errors.UserError`` with the one-line
message the command prints. See docs/api.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

Overrides = Union[Mapping[str, Any], Sequence[str], None]
PathLike = Union[str, "os.PathLike[str]"]


class Result(Mapping):
    """One run's results file, as a read-only mapping (every key of docs/results-schema.md) with the
    common keys as attributes (``result.acc``) and the file it lives in (``result.path``)."""

    def __init__(self, data: Dict[str, Any], path: Optional[Path] = None):
        self._data, self.path = data, path

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"this result has no key '{name}' (docs/results-schema.md)") from None

    def to_dict(self) -> Dict[str, Any]:
        """The results JSON as a plain dict (a copy)."""
        import copy

        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        acc = self._data.get("acc")
        return (f"Result({self._data.get('strategy')} on {self._data.get('benchmark')}, "
                f"order {self._data.get('order')}, seed {self._data.get('seed')}, "
                f"ACC {'–' if acc is None else f'{100 * acc:.1f}'}, path={str(self.path)!r})")


def override_list(overrides: Overrides) -> List[str]:
    """``{"learner.lr": 1e-4}`` or ``["learner.lr=1e-4"]`` as the ``key=value`` strings the CLI takes."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise TypeError("overrides: give a dict {'learner.lr': 1e-4} or a list ['learner.lr=1e-4'], not a string")
    if isinstance(overrides, Mapping):
        from .provenance import _value

        return [f"{k}={_value(v)}" for k, v in overrides.items()]
    return [str(item) for item in overrides]


def run(benchmark: str, strategy: Optional[str] = None, *, learner: Optional[str] = None,
        merger: Optional[str] = None, protocol: Optional[str] = None, order: Any = None, seed: int = 0,
        overrides: Overrides = None, out: PathLike = "results/runs", resume: bool = False,
        progress: bool = False) -> Result:
    """Run one strategy (or ``learner`` with ``merger``) on one benchmark stream, like ``cl-merge run``.

    Args:
        benchmark: a registered benchmark (``cl-merge list``), e.g. ``"mini"``.
        strategy: a registered strategy; or leave it out and give ``learner`` and ``merger``.
        protocol: ``"sequential"``, ``"independent"`` or ``"multitask"`` (default: the strategy's).
        order: the task-order id (default: the benchmark's); ``seed``: the run seed.
        overrides: settings, ``{"learner.lr": 1e-4, "benchmark.num_tasks": 3}`` (or ``key=value`` strings).
        out: the results directory; a finished run there is read back, not run again.
        resume: continue a killed run from its last step checkpoint.
        progress: live progress on stderr.

    Returns:
        the run's ``Result`` (its results JSON; ``result.path`` is the file).

    Raises:
        cl_merge.errors.UserError: a bad name, setting or path (the message names the fix).
    """
    from .config import resolve
    from .runner import execute, result_path

    config = resolve(benchmark, strategy=strategy, learner=learner, merger=merger, protocol=protocol, order=order,
                     seed=seed, overrides=override_list(overrides))
    existing = result_path(config, Path(out))
    if existing.exists() and not resume:  # the same configuration already ran here
        from .results import load_result

        return Result(load_result(existing), existing)
    data, path = execute(config, out_dir=Path(out), resume=resume, progress=progress)
    return Result(data, path)


def load_results(path: Union[PathLike, Sequence[PathLike]]) -> List[Result]:
    """Every results file at ``path`` (a file, or a directory searched recursively; or a list of them),
    validated (``schema_version``, the stable keys), in path order."""
    from .results import find_results, load_result

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [Result(load_result(f), f) for f in find_results(paths)]


class Leaderboard:
    """A leaderboard: ``rows`` (``cl_merge.grid.aggregate.Row``: mean ± std over orders), the
    ``results`` they come from, ``missing`` (configs without results) and the tables as text."""

    def __init__(self, rows, results: List[Result], missing, title: Optional[str], shared: Sequence[str]):
        self.rows, self.results, self.missing, self.title, self.shared = rows, results, missing, title, list(shared)

    @property
    def markdown(self) -> str:
        from .grid.formatting import markdown

        return markdown(self.rows, self.title, shared=self.shared)

    @property
    def csv(self) -> str:
        from .grid.formatting import csv_text

        return csv_text(self.rows, shared=self.shared)

    def records(self) -> List[Dict[str, Any]]:
        """One dict per row: strategy, protocol, T, n and each metric's mean/std (fractions)."""
        out = []
        for row in self.rows:
            rec: Dict[str, Any] = {"benchmark": row.benchmark, "strategy": row.name, "protocol": row.protocol,
                                   "T": row.T, "n": row.n, "diverged": row.diverged}
            for metric, (mean, std, _) in row.stats.items():
                rec[f"{metric}_mean"], rec[f"{metric}_std"] = mean, std
            out.append(rec)
        return out

    def __repr__(self) -> str:
        return f"Leaderboard({len(self.rows)} rows from {len(self.results)} runs, {len(self.missing)} missing)"


def leaderboard(grid: Union[PathLike, Mapping[str, Any]], *, report_only: bool = False, progress: bool = False,
                base_dir: Optional[PathLike] = None) -> Leaderboard:
    """Run a grid's missing runs (unless ``report_only``), then aggregate it, like ``cl-merge leaderboard``.

    Args:
        grid: a grid file (TOML, docs/grids.md) or the same content as a dict, e.g.
            ``{"benchmark": "mini", "strategies": ["c-ft", "c-ta"], "orders": [1, 2], "out": "runs"}``.
        report_only: aggregate the existing results only, run nothing.
        progress: live progress on stderr (an overall bar with ETA, and each run's bars).
        base_dir: what a dict grid's relative paths are relative to (default: the current directory).

    Returns:
        a ``Leaderboard`` (``rows``, ``results``, ``missing``, ``markdown``, ``csv``, ``records()``).
        Nothing is written besides the runs' result files; write ``board.markdown`` where you want it.
    """
    from .errors import UserError
    from .grid.aggregate import aggregate
    from .grid.local import collect
    from .grid.spec import expand, load_grid, parse_grid

    if isinstance(grid, Mapping):
        spec = parse_grid(dict(grid), base_dir=Path(base_dir or "."))
    else:
        spec = load_grid(Path(grid))
    configs = expand(spec)
    if not report_only:
        from .leaderboard import run_grid
        from .results import ensure_results_dir

        ensure_results_dir(spec.out)
        run_grid(configs, spec.out, progress=progress)
    results, missing = collect(configs, spec.out)
    if not results:
        raise UserError(f"no results for any of the {len(configs)} runs under {spec.out}; run it without "
                        "report_only")
    from .runner import result_path

    wrapped = [Result(r, result_path(c, spec.out)) for r, c in zip(results, [c for c in configs if c not in missing])]
    return Leaderboard(aggregate(results), wrapped, missing, spec.title, spec.overrides)
