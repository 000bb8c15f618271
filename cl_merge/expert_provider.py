"""Where a task's expert comes from: the expert cache, training, or its checkpoint file.

One place owns the rule for which experts are shared between runs (``shares_experts``) and how an
expert is obtained (``ExpertProvider.get``), so the protocol loop, the figures (``figure_experts.ExpertSource``)
and the Ray engine's expert tasks produce the same expert for the same (θ0, task, learner, seed):

* shared (the expert cache): independent or multitask protocol (both train every expert from θ0),
  a cacheable stateless learner, experts that are trained (not opened from files) and the cache switched on. Independent experts do not depend on
  their position in the stream, so the fit seed depends only on (run seed, task name);
* otherwise the learner trains from ``start`` with the per-step seed ``fit_seed``.
"""

from __future__ import annotations

import zlib
from typing import Optional, Tuple

from .expert_cache import ExpertCache, expert_key
from .learner import FitContext, Learner
from .params import StateDict, clone
from .progress import Reporter
from .task import Task

#: protocols whose experts are all fine-tuned from θ0, independent of their position in the stream:
#: they share fit seeds and expert-cache entries
INDEPENDENT_EXPERTS = ("independent", "multitask")


def fit_seed(seed: int, task: Task, step: int, protocol: str) -> int:
    """Per-fit seed from stable ingredients, so a resumed run and an uninterrupted one draw the same
    batches. Independent experts do not depend on their position (that is what makes them cacheable)."""
    position = 0 if protocol in INDEPENDENT_EXPERTS else step
    return zlib.crc32(f"{seed}:{task.name}:{position}".encode()) & 0x7FFFFFFF


def shares_experts(protocol: str, learner_cls, parameter_store: str = "memory", cache_enabled: bool = True) -> bool:
    """Whether a run's experts go through the expert cache (and so are shared with other runs)."""
    return (protocol in INDEPENDENT_EXPERTS and learner_cls.cacheable and not learner_cls.stateful
            and not learner_cls.opens_experts and parameter_store != "disk" and bool(cache_enabled))


class ExpertProvider:
    """Experts of one run: ``get(task, step, start)`` returns (expert, source), source being "cache"
    or the learner's ``expert_source``. ``cache`` is used only when ``shares_experts`` allows it."""

    def __init__(self, adapter, learner: Learner, learner_name: str, protocol: str, seed: int,
                 cache: Optional[ExpertCache], reporter: Optional[Reporter] = None, parameter_store: str = "memory"):
        self.adapter, self.learner, self.learner_name = adapter, learner, learner_name
        self.protocol, self.seed = protocol, seed
        shared = cache is not None and shares_experts(protocol, type(learner), parameter_store)
        self.cache = cache if shared else None
        self.reporter = reporter or Reporter(enabled=False)

    def cache_key(self, task: Task, step: int) -> str:
        return expert_key(self.adapter.base_fingerprint(), task.fingerprint, self.learner_name,
                          self.learner.config(), fit_seed(self.seed, task, step, self.protocol))

    def get(self, task: Task, step: int, start: StateDict, label: Optional[str] = None) -> Tuple[StateDict, str]:
        key = None
        if self.cache is not None:
            key = self.cache_key(task, step)
            expert = self.cache.get(key)
            if expert is not None:
                return expert, "cache"
        label = label or f"step {step} fine-tune {task.name}"
        with self.reporter.task(label, total=self.learner.step_budget()) as bar:
            ctx = FitContext(adapter=self.adapter, task=task, step=step,
                             seed=fit_seed(self.seed, task, step, self.protocol),
                             on_iteration=lambda i, loss: bar.update(i, f"loss {loss:.3f}"))
            expert = self.learner.fit(clone(start), ctx)
        if self.cache is not None:
            self.cache.put(key, expert)
        return expert, self.learner.expert_source
