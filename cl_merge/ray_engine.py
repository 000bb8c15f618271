"""Leaderboard grids on Ray (``cl-merge leaderboard GRID --engine ray [--address ...]``).

The executor is ``cl_merge.grid.ray_executor`` (driver) with ``cl_merge.grid.ray_tasks`` (what runs
on the workers); the planning of shared experts is ``cl_merge.grid.plan``. This module keeps the names
the CLI, the benchmarks and older code import.
"""

from .grid.outcome import GridOutcome  # noqa: F401
from .grid.plan import (ExpertJob, cache_dir_of, expert_plan_key, plan_experts, shares_experts,  # noqa: F401
                        task_names_of)
from .grid.ray_executor import (_TermAsInterrupt, check_resources, connect, error_line, import_ray,  # noqa: F401
                                run_grid)
