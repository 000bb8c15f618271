"""``cl-merge demo``: every strategy on the mini suite as one grid, run in this process or spread over
worker processes (``cl_merge.grid.local``).

The mini model is too small to use more than one core per run, so the demo runs strategies side by
side instead. Strategies that read the same cached experts form one group that runs in one worker, in
order: the first trains the experts into the shared cache, the others read them, as in a one-process
demo (``cl_merge.grid.plan``). Results do not depend on how the groups are spread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .config import RunConfig
from .grid.local import run_local, run_pool
from .grid.outcome import GridOutcome
from .grid.plan import group_key, plan_groups  # noqa: F401  (re-exported)


def demo_configs(strategies: Optional[Sequence[str]], order, seed: int,
                 overrides: Optional[Sequence[str]] = None) -> List[RunConfig]:
    """The demo grid: one mini run per strategy (default: every registered one), ``overrides``
    (``key=value``) applied to every run; every config is resolved (and so checked) before any runs."""
    from .config import resolve
    from .registry import STRATEGIES

    # one intra-op thread per run: the mini model is too small to gain from more (results do not depend on it)
    return [resolve("mini", strategy=name, order=order, seed=seed, overrides=["run.threads=1", *(overrides or [])])
            for name in (strategies or STRATEGIES.names())]


def run_demo(configs: Sequence[RunConfig], out_dir: Path, jobs: int, progress: bool = True,
             on_start: Optional[Callable[[RunConfig], None]] = None,
             on_result: Optional[Callable[[dict, Path], None]] = None) -> GridOutcome:
    """Every run afresh: in this process (``jobs == 1`` or a single run; ``on_start`` before each) or
    in ``jobs`` worker processes; ``on_result`` as each run finishes."""
    if jobs == 1 or len(configs) == 1:
        return run_local(configs, out_dir, resume=False, progress=progress,
                         on_start=(lambda _i, c: on_start(c)) if on_start else None,
                         on_done=(lambda _i, _c, result, path, _s: on_result(result, path)) if on_result else None)
    return run_pool(configs, out_dir, jobs, on_done=on_result)


def run_parallel(configs: Sequence[RunConfig], out_dir: Path, jobs: int,
                 on_result: Callable[[dict, Path], None]) -> List[dict]:
    """Run ``configs`` in ``jobs`` worker processes; the results in the order of ``configs``."""
    return run_pool(configs, out_dir, jobs, on_done=on_result).results
