"""Leaderboards over task orders: a grid of runs, run locally (finished runs are skipped), then
aggregated from the result files alone.

The grid is a TOML file (paths are relative to the file)::

    benchmark = "mini"
    strategies = "all"              # every registered strategy, or a list of names
    orders = [1, 2, 3, 4, 5]        # or "all"; default: the benchmark's default order
    seeds = [0]                     # default [0]
    num_tasks = [4, 9]              # benchmark.num_tasks per run (T); omit for the full stream
    overrides = ["run.sar_store=true"]   # key=value applied to every run
    out = "mini/runs"               # result files (default: runs/ next to this file)
    markdown = "mini/leaderboard.md"     # optional outputs (the CLI's --markdown/--csv win)
    csv = "mini/leaderboard.csv"
    title = "mini suite"

    [sweep]                         # optional: one run per value (product over keys) of each entry
    "merger.alpha" = {times_default = [0.5, 0.75, 1.0, 1.25, 1.5]}   # relative to each entry's default
    # "learner.lr" = [1e-4, 3e-4]  # or absolute values; entries that lack a key are not swept on it
    select = "val_acc"              # optional: per strategy, keep the swept setting with the best mean
                                    # final-row validation accuracy and report its test figures

    [ray]                           # only for `--engine ray` (cl_merge.ray_engine); all optional
    num_cpus = 1                    # CPUs per run (and per shared-expert training)
    num_gpus = 0.25                 # GPUs per run; fractions pack several runs on one device
    max_retries = 3                 # re-runs after a worker/node died (a run's own error: never)

    [[runs]]                        # more entries: a strategy with its own overrides, or any
    learner = "adam"                # learner x merger (x protocol) combination
    merger = "swa"
    protocol = "sequential"
    overrides = ["learner.lr=3e-4"]
    sweep = {"merger.alpha" = [0.2, 0.3]}   # this entry's own axis (wins over the top-level one)

Selection on validation data (``select = "val_acc"``; SAIM Eq. 12's "validation set search", done
per run, not per step). Every run records ``val_acc``: the final deployed model's accuracy on each
task's validation split. ``select_by_validation`` groups runs by (benchmark, model, strategy,
protocol, T), scores each swept setting by the mean over its runs (orders × seeds) of the mean over
tasks of ``val_acc``, and keeps the best one (ties: the first in sorted order); it reads nothing
else from a result, so the test split never enters the choice. The report then shows the selected
setting's test ACC/BWT (row marked "tuned on val: KEY=VALUE") beside the table at the entries' own
default values (every swept entry also runs at its defaults). With ``times_default`` every merging
strategy's main coefficient is tuned on the same relative grid. Why not ``merger.alpha_grid`` (α per
step on the current task's validation split)? It favours the task just added (measured on mini:
α = 1.0 at 6–7 of 9 steps, BWT −18.8) and compounds through Δ_cum; it stays an option of the
isotropic merger.

The code lives in ``cl_merge.grid``: ``spec`` (``load_grid`` reads and checks the file, ``expand``
turns it into resolved ``RunConfig`` objects, every name and override checked before anything runs),
``local`` (``run_local``: the missing runs in order, ``runner.execute(..., resume=True)``: a finished
run's result file is reused, a killed run continues from its checkpoint), ``ray_executor``,
``aggregate`` (result dicts into leaderboard rows), ``selection``, ``reference`` and ``formatting``.
This module keeps the names the CLI and older code import.

Aggregation: one row per (benchmark, strategy, protocol, T, hyperparameters); ACC, BWT, SAR at the
final step and normalized ACC as mean ± sample standard deviation (n − 1) over the group's runs
(orders × seeds); per-order values (mean over seeds); the worst order = lowest ACC.
"""


from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Sequence

from .config import RunConfig
from .errors import UserError  # noqa: F401  (re-exported)
from .grid.aggregate import METRICS, Row, aggregate, final_sar, mean_std  # noqa: F401
from .grid.formatting import (all_orders, csv_text, footnotes, markdown, reference_notes,  # noqa: F401
                              rich_table, table_cells, table_columns, title_of, with_reference)
from .grid.local import collect, run_local
from .grid.outcome import GridOutcome
from .grid.reference import (REFERENCE_ALIASES, REFERENCE_BENCHMARKS, REFERENCE_TABLE,  # noqa: F401
                             backbone_of, load_reference, match_reference)
from .grid.selection import mark_tuned, select_by_validation, validation_score  # noqa: F401
from .grid.spec import RAY_DEFAULTS, SELECTIONS, Grid, GridEntry, expand, load_grid, parse_grid  # noqa: F401

__all__ = ["Grid", "GridEntry", "GridOutcome", "Row", "aggregate", "collect", "csv_text", "expand", "footnotes",
           "load_grid", "load_reference", "markdown", "parse_grid", "rich_table", "run_grid",
           "select_by_validation"]


def run_grid(configs: Sequence[RunConfig], out_dir: Path, progress: bool = True, console=None) -> GridOutcome:
    """Execute every config whose result file is missing (resume=True), one line per run on ``console``,
    under an overall bar with ETA (``progress``; off a terminal, one timestamped line per run)."""
    from .progress import overall

    def head(i: int, config: RunConfig) -> str:
        return (f"[{i}/{len(configs)}] {config.label} ({config.protocol}) "
                f"T={config.benchmark_params.get('num_tasks') or 'all'} order {config.order} seed {config.seed}")

    with overall(f"grid: {len(configs)} runs", total=len(configs), enabled=progress) as bar:
        if console is None:
            return run_local(configs, out_dir, progress=progress, on_skip=lambda i, c: bar.skip(),
                             on_done=lambda *_: bar.advance())

        def done(i, config, result, _path, seconds):
            score = "diverged" if result.get("diverged") else f"ACC {100 * result['acc']:.1f}"
            console.print(f"{head(i, config)}: {score} in {seconds:.1f} s", highlight=False)
            bar.advance()

        def skipped(i, config):
            console.print(f"{head(i, config)}: finished earlier, skipped", highlight=False)
            bar.skip()

        return run_local(configs, out_dir, progress=progress, on_skip=skipped,
                         on_start=lambda i, c: console.rule(head(i, c)), on_done=done)


class _CallableModule(types.ModuleType):
    """``cl_merge.leaderboard(...)`` is the API's leaderboard call (cl_merge.api.leaderboard) whether
    the name resolves to that function or to this module (importing a submodule sets the package's
    attribute to the module)."""

    def __call__(self, *args, **kwargs):
        from .api import leaderboard

        return leaderboard(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
