"""Continual task arithmetic (C-TA): deployed_t = θ0 + α Σ_{s≤t} τ_s, kept as a running sum."""

from __future__ import annotations

import dataclasses

import torch

from cl_merge.merger import Merger
from cl_merge.registry import register_merger


@register_merger
@dataclasses.dataclass
class TaskArithmeticMerger(Merger):
    name = "task_arithmetic"
    protocols = ("sequential", "independent", "multitask")  # the last step is the all-at-once merge
    description = "θ0 + α · running sum of task vectors"
    alpha: float = 0.3

    def tensor_state_keys(self):
        return ("sum",)

    def merge_tensor(self, x):
        total = x.state.get("sum", torch.zeros_like(x.base)) + x.tau
        x.new_state["sum"] = total
        return x.base + self.alpha * total
