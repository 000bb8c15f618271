"""Which runs of a grid share experts, decided before anything runs.

Every executor plans with the expert provider's own rule (``expert_provider.shares_experts``):
``expert_plan_key`` names one independent expert by everything its cache key depends on, known
from the config alone; ``plan_experts`` lists the distinct experts of a grid (the Ray executor trains
each once); ``plan_groups`` puts runs that read the same experts into one group (the process-pool
executor runs a group in one worker, so its first run trains them and the others read the cache).
The plan only decides sharing: a run whose expert was not planned still trains it itself, so results
never depend on the plan.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import RunConfig

# Rough cost of one mini run by learner, relative to plain Adam (benchmarks/perf/avalanche_overhead.py,
# sa_bcd_step.py): used only to start the longest groups first.
_LEARNER_COST = {"sa_bcd": 2.0, "sam": 2.0, "asam": 2.0, "ewc": 2.2, "er": 3.0}


def shares_experts(config: RunConfig) -> bool:
    """Whether the run's experts come from the expert cache (the protocol's own rule)."""
    from ..expert_provider import shares_experts as rule
    from ..registry import BENCHMARKS, LEARNERS

    return rule(config.protocol, LEARNERS.get(config.learner), BENCHMARKS.get(config.benchmark).parameter_store,
                config.run_params.get("expert_cache", True))


def cache_dir_of(config: RunConfig, out_dir: Path) -> str:
    return str(config.run_params.get("cache_dir") or Path(out_dir) / ".cache")


def expert_plan_key(config: RunConfig, task_name: str, out_dir: Path) -> str:
    """Everything the expert cache key depends on, known before anything is built: the benchmark and
    its settings except the stream length (θ0 and the task's data), the task, the learner and its
    config, the run seed (the fit seed of an independent expert is (seed, task name)), and the cache."""
    bench = {k: v for k, v in config.benchmark_params.items() if k != "num_tasks"}
    return json.dumps([config.benchmark, bench, task_name, config.learner, config.learner_params,
                       config.seed, cache_dir_of(config, out_dir)], sort_keys=True, default=str)


def task_names_of(config: RunConfig) -> Optional[List[str]]:
    from ..registry import BENCHMARKS

    return BENCHMARKS.get(config.benchmark)(**config.benchmark_params).task_names(config.order)


@dataclasses.dataclass
class ExpertJob:
    key: str
    config: RunConfig  # a run whose stream holds the task (its stream is built to find the task)
    task: str
    users: int = 0  # run steps that read this expert


def plan_experts(configs: Sequence[RunConfig], out_dir: Path,
                 names: Dict[str, Optional[List[str]]]) -> Tuple[Dict[str, ExpertJob], Dict[str, List[str]]]:
    """Distinct experts and, per run id, the plan keys its steps read."""
    jobs: Dict[str, ExpertJob] = {}
    needs: Dict[str, List[str]] = {}
    for config in configs:
        if not shares_experts(config) or not names.get(config.run_id()):
            continue
        keys = []
        for task in names[config.run_id()]:
            key = expert_plan_key(config, task, out_dir)
            job = jobs.setdefault(key, ExpertJob(key=key, config=config, task=task))
            job.users += 1
            if key not in keys:
                keys.append(key)
        needs[config.run_id()] = keys
    return jobs, needs


def group_key(config: RunConfig, out_dir: Path) -> str:
    """Runs with equal keys read the same cached experts; runs that train their own (sequential,
    stateful learners) get a key of their own."""
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
