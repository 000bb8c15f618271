"""MagMax-IND (Marczak et al. 2024; SAIM paper appendix C.3, "Maximum Magnitude Selection").

Per entry j, keep the task vector entry of largest magnitude seen so far,
    τ_max,j = τ_{s*,j},  s* = argmax_{s ≤ t} |τ_{s,j}|   (ties go to the later task),
and deploy θ0 + λ τ_max (λ = 0.5; the field is ``alpha``, the appendix's name for it). The state is
that running selection only: one model-sized set of tensors.
"""

from __future__ import annotations

import dataclasses

import torch

from cl_merge.merger import Merger
from cl_merge.registry import register_merger


@register_merger
@dataclasses.dataclass
class MagMaxMerger(Merger):
    name = "magmax"
    protocols = ("sequential", "independent", "multitask")  # the last step is the all-at-once merge
    description = "θ0 + α · per-entry max-magnitude task vector (running selection)"
    alpha: float = 0.5  # λ of docs/, α of the SAIM appendix

    def tensor_state_keys(self):
        return ("max",)

    def merge_tensor(self, x):
        v = x.tau
        best = x.state.get("max", torch.zeros_like(x.base))
        # ">=": an equal magnitude goes to the later task
        best = torch.where(v.abs() >= best.abs(), v, best)
        x.new_state["max"] = best
        return x.base + self.alpha * best
