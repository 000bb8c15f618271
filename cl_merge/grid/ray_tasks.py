"""What runs on a Ray worker (plain functions, wrapped with ``ray.remote`` by ``ray_executor`` at run
time, Ray being optional): a stream's task names, one shared expert trained into the expert cache,
one run of the grid, and the per-run attempt record on the results' storage."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

from ..config import RunConfig
from .plan import cache_dir_of

def _enter(cwd: Optional[str], threads: int) -> None:
    """Same working directory as the driver where it exists (relative run.cache_dir means the same),
    and torch's intra-op threads = the run's CPUs unless run.threads says otherwise."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    import torch

    torch.set_num_threads(max(1, threads))


def stream_names(config: RunConfig, cwd: Optional[str], threads: int) -> List[str]:
    """Task names of a benchmark that cannot name them without building its stream."""
    _enter(cwd, threads)
    from ..config import instantiate

    benchmark = instantiate(config)[0]
    return [t.name for t in benchmark.build_stream(order=config.order, seed=config.seed).tasks]


def train_expert(config: RunConfig, task_name: str, out_dir: str, cwd: Optional[str],
                  threads: int) -> Dict[str, Any]:
    """Train one independent expert into the expert cache exactly as ``run_protocol`` would (same start,
    fit seed and context), unless the cache already holds it."""
    _enter(cwd, threads)
    import cl_merge  # noqa: F401  (torchvision shim before open_clip)
    from ..config import instantiate
    from ..expert_cache import ExpertCache, layout_of
    from ..expert_provider import ExpertProvider
    from ..runner import resolve_device

    t0 = time.perf_counter()
    benchmark, learner, _merger, settings = instantiate(config)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    cache_dir = Path(cache_dir_of(config, Path(out_dir)))
    adapter = benchmark.build_model(cache_dir=cache_dir, device=device, eval_batch_size=settings.eval_batch_size)
    tasks = benchmark.build_stream(order=config.order, seed=config.seed).tasks
    for task in tasks:  # as run_protocol does before it reads θ0
        adapter.prepare(task)
    position = [t.name for t in tasks].index(task_name) + 1
    task = tasks[position - 1]
    theta0 = adapter.get_state()
    cache = ExpertCache(cache_dir / "experts", expected=layout_of(theta0))
    provider = ExpertProvider(adapter, learner, config.learner, "independent", config.seed, cache)
    try:  # the cache holds the entry's lock from get until put: trained once across processes
        _, source = provider.get(task, position, theta0)
    finally:
        cache.release()
    return {"task": task_name, "learner": config.learner, "cache_key": provider.cache_key(task, position),
            "trained": source != "cache", "seconds": time.perf_counter() - t0}


def run_one(config: RunConfig, out_dir: str, cwd: Optional[str], threads: int,
            around_run: Optional[Callable[[RunConfig], Optional[ContextManager]]],
            *experts: Dict[str, Any]) -> Dict[str, Any]:
    """One run of the grid. ``experts`` are the results of the expert tasks it depends on: Ray starts
    this task only once they are done (their experts are then in the cache). ``around_run(config)``,
    when given, returns a context manager entered around the run (tests inject faults with it)."""
    _enter(cwd, threads)
    import cl_merge  # noqa: F401
    from ..step_checkpoint import Checkpointer
    from ..runner import execute

    out = Path(out_dir)
    run_id = config.run_id()
    Attempts(out).start(run_id)
    checkpoint = Checkpointer(out / f"{run_id}.ckpt", config.fingerprint())
    resumed_from = None
    if checkpoint.exists():
        try:
            resumed_from = int(json.loads(checkpoint.state_path.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            resumed_from = None  # execute names a corrupt checkpoint
    t0 = time.perf_counter()
    with (around_run(config) if around_run is not None else None) or contextlib.nullcontext():
        result, path = execute(config, out_dir=out, resume=True, progress=False)
    return {"run_id": run_id, "acc": result["acc"], "path": str(path), "resumed_from": resumed_from,
            "expert_source": result.get("expert_source"), "seconds": time.perf_counter() - t0}


class Attempts:
    """Which runs have started, and how often (one line per attempt in ``<out>/.ray/attempts/<run id>``,
    on the storage the results go to): the driver's 'running' count and its retry record."""

    def __init__(self, out_dir: Path):
        self.directory = Path(out_dir) / ".ray" / "attempts"

    def start(self, run_id: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / run_id, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.3f} pid {os.getpid()}\n")

    def reset(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            (self.directory / run_id).unlink(missing_ok=True)

    def started(self) -> set:
        try:
            return set(os.listdir(self.directory))
        except OSError:
            return set()

    def count(self, run_id: str) -> int:
        try:
            return len((self.directory / run_id).read_text().splitlines())
        except OSError:
            return 0


