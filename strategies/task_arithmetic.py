"""Continual task arithmetic (C-TA): deployed_t = θ0 + α Σ_{s≤t} τ_s, kept as a running sum."""

from __future__ import annotations

import dataclasses

from cl_merge.merger import Merger
from cl_merge.params import add_scaled, sub, zeros_like
from cl_merge.registry import register_merger


@register_merger
@dataclasses.dataclass
class TaskArithmeticMerger(Merger):
    name = "task_arithmetic"
    description = "θ0 + α · running sum of task vectors"
    alpha: float = 0.3

    def reset(self, base):
        self._sum = zeros_like(base)

    def merge(self, base, previous, expert, start, step):
        tau = sub(expert, start)
        for k in self._sum:
            self._sum[k] += tau[k]
        return add_scaled(base, self._sum, self.alpha)

    def state_dict(self):
        return {f"sum.{k}": v for k, v in self._sum.items()}

    def load_state_dict(self, state):
        self._sum = {k[len("sum."):]: v.clone() for k, v in state.items()}
