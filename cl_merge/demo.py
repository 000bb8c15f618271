"""``cl-merge demo``: every strategy on the mini suite, spread over worker processes.

The mini model is too small to use more than one core per run, so the demo runs strategies side by
side instead. Strategies that read the same cached experts (same benchmark settings, learner, learner
hyperparameters, seed and cache) form one group that runs in one worker, in order: the first trains the experts into
the shared cache, the others read them, as in a one-process demo. Results do not depend on how the
groups are spread (every run is seeded by its config alone).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from .config import RunConfig

# Rough cost of one mini run by learner, relative to plain Adam (benchmarks/perf/avalanche_overhead.py,
# sa_bcd_step.py): used only to start the longest groups first.
_LEARNER_COST = {"sa_bcd": 2.0, "sam": 2.0, "asam": 2.0, "ewc": 2.2, "er": 3.0}


def group_key(config: RunConfig, out_dir: Path) -> str:
    """Runs with equal keys read the same cached experts (the Ray engine's planning rule); runs that
    train their own (sequential, stateful learners) get a key of their own."""
    from .ray_engine import expert_plan_key, shares_experts  # planning only: Ray itself is not imported

    if not shares_experts(config):
        return f"own:{config.label}"
    return expert_plan_key(config, "", out_dir)  # the same for every task of the stream


def plan_groups(configs: Sequence[RunConfig], out_dir: Path) -> List[List[int]]:
    """Indices of ``configs`` grouped by ``group_key`` (listing order kept inside a group), the
    groups ordered by estimated cost, largest first."""
    groups: Dict[str, List[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(group_key(config, out_dir), []).append(i)

    def cost(group: List[int]) -> float:
        train = _LEARNER_COST.get(configs[group[0]].learner, 1.0)
        return train + 0.3 * len(group)  # one expert set (or sequential stream) + evaluation per run

    return sorted(groups.values(), key=cost, reverse=True)


def _run_group(configs: List[RunConfig], out_dir: str) -> List[Tuple[str, dict, str]]:
    from .runner import execute

    done = []
    for config in configs:
        result, path = execute(config, out_dir=Path(out_dir), progress=False)
        done.append((config.label, result, str(path)))
    return done


def run_parallel(configs: Sequence[RunConfig], out_dir: Path, jobs: int,
                 on_result: Callable[[dict, Path], None]) -> List[dict]:
    """Run ``configs`` in ``jobs`` worker processes; ``on_result`` is called in this process as each
    run finishes. Returns the results in the order of ``configs``."""
    from .results import ensure_results_dir

    ensure_results_dir(out_dir)  # once, before the workers write into it
    by_strategy: Dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_run_group, [configs[i] for i in group], str(out_dir))
                   for group in plan_groups(configs, out_dir)]
        for future in as_completed(futures):
            for strategy, result, path in future.result():
                by_strategy[strategy] = result
                on_result(result, Path(path))
    return [by_strategy[c.label] for c in configs]
