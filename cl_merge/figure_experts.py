"""The experts the analysis figures read: θ0, the stream and independently fine-tuned experts of
one benchmark, got through the protocol's own expert provider (same per-task seeds and expert-cache
keys), so experts already trained by leaderboard runs with the same cache directory are reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from .errors import UserError

DEFAULT_CACHE = Path(".cl_merge_cache")


class ExpertSource:
    """θ0, the stream and independently fine-tuned experts for one benchmark, trained exactly like the
    independent protocol trains them (same per-task seeds and expert-cache keys), so experts already
    trained by leaderboard runs with the same cache directory are reused."""

    def __init__(self, benchmark: str, learners: Sequence[str], order: Any = None, seed: int = 0,
                 overrides: Sequence[str] = (), progress: bool = True):
        from .config import instantiate, resolve
        from .runner import resolve_device

        self.benchmark_name, self.overrides = benchmark, list(overrides)
        # every learner is resolved now, so a bad name or override fails before anything trains
        configs = [resolve(benchmark, learner=name, merger="identity", protocol="independent", order=order,
                           seed=seed, overrides=self.overrides) for name in learners]
        for config in configs:
            if instantiate(config)[1].stateful:
                raise UserError(f"learner '{config.learner}' keeps state across tasks, but these figures fine-tune "
                                "every task independently from θ0; use a stateless learner (see `cl-merge list`)")
        base = configs[0]
        bench, _, _, settings = instantiate(base)
        self.settings, self.order, self.seed = settings, base.order, base.seed
        self.cache_dir = Path(settings.cache_dir) if settings.cache_dir else DEFAULT_CACHE
        self.progress = progress
        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = resolve_device(settings.device)
        self.adapter = bench.build_model(cache_dir=self.cache_dir, device=device,
                                         eval_batch_size=settings.eval_batch_size)
        self.stream = bench.build_stream(order=base.order, seed=base.seed)
        for task in self.stream.tasks:
            self.adapter.prepare(task)
        self.theta0 = self.adapter.get_state()

    def task_index(self, ref: str) -> int:
        """0-based position of a task given by name or 1-based position in the stream."""
        names = self.stream.names
        if ref in names:
            return names.index(ref)
        if ref.isdigit() and 1 <= int(ref) <= len(names):
            return int(ref) - 1
        raise UserError(f"task '{ref}' is not in this stream; use a name or position 1..{len(names)}: "
                        f"{', '.join(names)}")

    def experts(self, learner_name: str, indices: Sequence[int]) -> Dict[int, Dict[str, torch.Tensor]]:
        from .config import instantiate, resolve
        from .expert_cache import ExpertCache
        from .expert_provider import ExpertProvider
        from .progress import Reporter

        config = resolve(self.benchmark_name, learner=learner_name, merger="identity", protocol="independent",
                         order=self.order, seed=self.seed, overrides=self.overrides)
        _, learner, _, _ = instantiate(config)
        cache = ExpertCache(self.cache_dir / "experts") if self.settings.expert_cache else None
        out = {}
        with Reporter(enabled=self.progress) as reporter:
            provider = ExpertProvider(self.adapter, learner, learner_name, "independent", config.seed, cache, reporter)
            for i in indices:
                task = self.stream.tasks[i]
                out[i], _ = provider.get(task, i + 1, self.theta0, label=f"{learner_name}: fine-tune {task.name}")
        self.adapter.set_state(self.theta0)
        return out

