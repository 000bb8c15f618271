"""The local executors: one process running the grid's runs in order (``run_local``), or worker
processes running groups of runs that share experts (``run_pool``). Both return a ``GridOutcome``."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..config import RunConfig
from ..results import load_result
from .outcome import GridOutcome
from .plan import plan_groups

OnDone = Callable[[int, RunConfig, Dict[str, Any], Path, float], None]  # position, config, result, file, seconds


def run_local(configs: Sequence[RunConfig], out_dir: Path, resume: bool = True, progress: bool = True,
              on_start: Optional[Callable[[int, RunConfig], None]] = None,
              on_skip: Optional[Callable[[int, RunConfig], None]] = None,
              on_done: Optional[OnDone] = None) -> GridOutcome:
    """Execute ``configs`` in this process, in order. With ``resume`` a run whose result file exists is
    skipped (and its leftover checkpoint dropped) and a killed run continues from its checkpoint;
    without it every run starts afresh. The callbacks get the run's 1-based position."""
    from ..runner import drop_leftover_checkpoint, execute, result_path

    outcome = GridOutcome()
    t_start = time.perf_counter()
    for i, config in enumerate(configs, start=1):
        path = result_path(config, out_dir)
        if resume and path.exists():
            load_result(path)  # a corrupt file stops here, named
            drop_leftover_checkpoint(config, out_dir)
            outcome.finished_before += 1
            if on_skip is not None:
                on_skip(i, config)
            continue
        if on_start is not None:
            on_start(i, config)
        t0 = time.perf_counter()
        result, path = execute(config, out_dir=out_dir, resume=resume, progress=progress)
        outcome.ran += 1
        outcome.results.append(result)
        if on_done is not None:
            on_done(i, config, result, path, time.perf_counter() - t0)
    outcome.wall_s = time.perf_counter() - t_start
    return outcome


def _run_group(configs: List[RunConfig], out_dir: str) -> List[Tuple[str, dict, str]]:
    from ..runner import execute

    done = []
    for config in configs:
        result, path = execute(config, out_dir=Path(out_dir), progress=False)
        done.append((config.label, result, str(path)))
    return done


def run_pool(configs: Sequence[RunConfig], out_dir: Path, jobs: int,
             on_done: Optional[Callable[[dict, Path], None]] = None) -> GridOutcome:
    """Run ``configs`` afresh in ``jobs`` worker processes, one group of expert-sharing runs
    (``plan_groups``) per task, in order inside a group; ``on_done`` is called in this process as each
    run finishes. Results do not depend on how the groups are spread (every run is seeded by its config
    alone); ``outcome.results`` keeps the order of ``configs``."""
    from ..results import ensure_results_dir

    ensure_results_dir(out_dir)  # once, before the workers write into it
    t_start = time.perf_counter()
    by_label: Dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_run_group, [configs[i] for i in group], str(out_dir))
                   for group in plan_groups(configs, out_dir)]
        for future in as_completed(futures):
            for label, result, path in future.result():
                by_label[label] = result
                if on_done is not None:
                    on_done(result, Path(path))
    results = [by_label[c.label] for c in configs]
    return GridOutcome(ran=len(results), results=results, wall_s=time.perf_counter() - t_start)


def collect(configs: Sequence[RunConfig], out_dir: Path) -> Tuple[List[Dict[str, Any]], List[RunConfig]]:
    """The grid's result files (loaded and validated) and the configs that have none yet."""
    from ..runner import result_path

    results, missing = [], []
    for config in configs:
        path = result_path(config, out_dir)
        if path.exists():
            results.append(load_result(path))
        else:
            missing.append(config)
    return results, missing
