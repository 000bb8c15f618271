"""What a grid will cost before it runs (``cl-merge plan``): counts from the code the runs use, priced
by per-phase seconds (``cl_merge.calibration``).

Counts per run come from ``protocol.loop_counts`` (the loop's own tally, checked against real runs in
tests/test_plan.py), the learner's ``step_budget`` and the benchmark's split sizes; which experts are
trained once and read by the other runs comes from ``plan.plan_experts`` (the executors' sharing
plan), and a shared expert's training is charged to the first run that reads it, as the local
executor does. Nothing here builds a model, except ``count_cached`` (the real expert-cache keys).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import RunConfig, instantiate
from .plan import ExpertJob, plan_experts, shares_experts, task_names_of

PHASES = ("setup", "fit", "eval", "merge", "sar", "fisher", "checkpoint")


@dataclasses.dataclass
class RunCost:
    """One run's counts (and, once priced, seconds per phase; None where no cost is known)."""

    config: RunConfig
    T: int
    calibration_key: str
    trains: bool  # its learner trains experts (not opened from files)
    shared: bool  # its experts go through the expert cache (plan.shares_experts)
    steps_per_fit: int
    batch_size: Optional[int]
    train_size: Optional[float] = None  # mean training examples per task (None: unknown)
    fits_trained: int = 0  # experts this run trains itself (shared: the planned experts it reads first)
    fits_cached: int = 0  # experts read from the cache (trained by an earlier run of the grid)
    merges: int = 0
    test_evals: int = 0
    val_evals: int = 0  # final validation row + validation scores of merges (alpha_grid)
    merge_val_evals: int = 0
    test_samples: Optional[int] = 0
    val_samples: Optional[int] = 0
    sar_steps: int = 0
    sar_scores: int = 0
    fishers: int = 0
    fisher_samples: Optional[int] = 0
    finished: bool = False  # its result file exists (a leaderboard run skips it)
    seconds: Dict[str, Optional[float]] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def fine_tune_steps(self) -> int:
        return self.fits_trained * self.steps_per_fit

    @property
    def total_seconds(self) -> Optional[float]:
        values = [self.seconds.get(p) for p in PHASES]
        return None if any(v is None for v in values) else sum(values)


def calibration_key(benchmark) -> str:
    """The model a run's phase costs belong to, e.g. ``vision20:open_clip:ViT-B-32/openai``."""
    model = benchmark.model_id() if callable(getattr(benchmark, "model_id", None)) else (
        getattr(benchmark, "model", None) or getattr(benchmark, "base", None))
    return f"{benchmark.name}:{model}" if model else benchmark.name


def _sizes(benchmark, names: Sequence[str]) -> Optional[List[Dict[str, int]]]:
    """Per task {train, val, test} sizes, or None when the benchmark cannot say without its data."""
    fn = getattr(benchmark, "split_sizes", None)
    if fn is None:
        return None
    sizes = [fn(n) for n in names]
    return None if any(s is None for s in sizes) else sizes


def run_cost(config: RunConfig) -> RunCost:
    """The counts of one run (its expert sharing is decided grid-wide by ``grid_cost``)."""
    from ..protocol import fisher_settings, loop_counts

    benchmark, learner, merger, settings = instantiate(config)
    names = task_names_of(config)
    if names is None:
        names = benchmark.build_stream(order=config.order, seed=config.seed).names
    T = len(names)
    sizes = _sizes(benchmark, names)
    grid_scores = len(getattr(merger, "alpha_grid", ()) or ())
    needs_fisher = bool(getattr(merger, "needs_fisher", False))
    counts = loop_counts(config.protocol, T, eval_unseen=settings.eval_unseen, sar=settings.sar,
                         sar_store=settings.sar_store, validation_scores_per_merge=grid_scores,
                         needs_fisher=needs_fisher,
                         has_val=[getattr(benchmark, "has_validation", True)] * T if sizes is None
                         else [s.get("val", 0) > 0 for s in sizes])
    trains = not learner.opens_experts and learner.step_budget() > 0
    cost = RunCost(config=config, T=T, calibration_key=calibration_key(benchmark), trains=trains,
                   shared=shares_experts(config), steps_per_fit=learner.step_budget() if trains else 0,
                   batch_size=getattr(learner, "batch_size", None), merges=counts.merges,
                   test_evals=sum(counts.test_evals), val_evals=sum(counts.val_evals),
                   merge_val_evals=grid_scores * counts.merges if config.protocol != "multitask" else 0,
                   sar_steps=counts.sar_steps, sar_scores=counts.sar_scores, fishers=counts.fishers)
    cost.fits_trained = T if trains else 0
    if sizes is None:
        cost.test_samples = cost.val_samples = None
        cost.fisher_samples = None if counts.fishers else 0
    else:
        cost.train_size = sum(s["train"] for s in sizes) / T
        cost.test_samples = sum(n * s["test"] for n, s in zip(counts.test_evals, sizes))
        cost.val_samples = sum(n * s.get("val", 0) for n, s in zip(counts.val_evals, sizes))
        if counts.fishers:
            fs = fisher_settings(merger, config.seed)
            cost.fisher_samples = sum(min(s["train"], max(fs.min_samples, math.ceil(fs.fraction * s["train"])))
                                      for s in sizes)
    cost.names = names  # type: ignore[attr-defined]  (used by grid_cost's sharing plan)
    return cost


@dataclasses.dataclass
class GridCost:
    runs: List[RunCost]
    experts: Dict[str, ExpertJob]  # the distinct shared experts (plan.plan_experts)
    own_experts: int  # experts trained by runs that do not share (sequential, stateful learners)
    cached: Optional[int] = None  # planned experts already in the expert cache (None: not checked)

    @property
    def distinct_experts(self) -> int:
        return len(self.experts) + self.own_experts

    def total(self, attr: str) -> Optional[float]:
        values = [getattr(r, attr) for r in self.runs]
        return None if any(v is None for v in values) else sum(values)

    def phase_seconds(self, phase: str, runs: Optional[Sequence[RunCost]] = None) -> Optional[float]:
        values = [r.seconds.get(phase) for r in (self.runs if runs is None else runs)]
        return None if any(v is None for v in values) else sum(values)


def grid_cost(configs: Sequence[RunConfig], out_dir: Path) -> GridCost:
    """Counts of every run of a grid, with the executors' expert-sharing plan applied: each planned
    expert is trained by the first run (in grid order) that reads it; the others read the cache.
    Fisher diagonals of shared experts are cached beside them, so they are counted once as well."""
    from ..fisher import cache_tag
    from ..protocol import fisher_settings
    from ..runner import result_path

    runs = [run_cost(c) for c in configs]
    names = {r.config.run_id(): r.names for r in runs}  # type: ignore[attr-defined]
    jobs, needs = plan_experts(configs, out_dir, names)
    seen, fisher_seen = set(), set()
    own = 0
    for r in runs:
        r.finished = result_path(r.config, out_dir).exists()
        if not r.trains:
            r.fits_trained = 0
            continue
        if r.config.run_id() not in needs:
            own += r.T
            continue
        keys = needs[r.config.run_id()]
        fresh = [k for k in keys if k not in seen]
        seen.update(keys)
        r.fits_trained, r.fits_cached = len(fresh), r.T - len(fresh)
        if r.fishers:  # one diagonal per (expert, Fisher settings), kept beside the expert
            _, _, merger, _ = instantiate(r.config)
            tag = cache_tag(fisher_settings(merger, r.config.seed))
            new = [k for k in keys if (k, tag) not in fisher_seen]
            fisher_seen.update((k, tag) for k in keys)
            if r.fisher_samples is not None and r.fishers:
                r.fisher_samples = round(r.fisher_samples * len(new) / r.fishers)
            r.fishers = len(new)
    return GridCost(runs=runs, experts=jobs, own_experts=own)


def count_cached(cost: GridCost, out_dir: Path) -> Optional[int]:
    """How many planned experts are already in their expert cache: 0 when no cache directory holds
    an expert; otherwise the real cache keys (``ExpertProvider.cache_key``: θ0 and task fingerprints)
    are computed by building the model and streams, and None is returned when that is not possible
    here (e.g. weights or data that are not on this machine)."""
    from ..expert_provider import ExpertProvider
    from .plan import cache_dir_of

    dirs = {cache_dir_of(job.config, out_dir) for job in cost.experts.values()}
    if not any(any((Path(d) / "experts").glob("*.safetensors")) for d in dirs if (Path(d) / "experts").is_dir()):
        return 0
    found = 0
    adapters: Dict[str, Any] = {}
    try:
        for job in cost.experts.values():
            benchmark, learner, _, settings = instantiate(job.config)
            cache_dir = Path(cache_dir_of(job.config, out_dir))
            key = calibration_key(benchmark)
            if key not in adapters:
                adapters[key] = benchmark.build_model(cache_dir=cache_dir, device="cpu",
                                                      eval_batch_size=settings.eval_batch_size)
            stream = benchmark.build_stream(order=job.config.order, seed=job.config.seed)
            position = stream.names.index(job.task)
            provider = ExpertProvider(adapters[key], learner, job.config.learner, job.config.protocol,
                                      job.config.seed, None)
            cache_key = provider.cache_key(stream.tasks[position], position + 1)
            found += (cache_dir / "experts" / f"{cache_key}.safetensors").exists()
    except Exception:  # noqa: BLE001 - any failure to rebuild θ0 or a task means "not known here"
        return None
    return found
