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
from cl_merge.params import sub, zeros_like
from cl_merge.registry import register_merger


@register_merger
@dataclasses.dataclass
class MagMaxMerger(Merger):
    name = "magmax"
    description = "θ0 + α · per-entry max-magnitude task vector (running selection)"
    alpha: float = 0.5  # λ of DESIGN.md, α of the SAIM appendix

    def reset(self, base):
        self._max = zeros_like(base)

    def merge(self, base, previous, expert, start, step):
        tau = sub(expert, start)
        for n, v in tau.items():
            # ">=": an equal magnitude goes to the later task
            self._max[n] = torch.where(v.abs() >= self._max[n].abs(), v, self._max[n])
        return {n: base[n] + self.alpha * self._max[n] for n in base}

    def state_dict(self):
        return {f"max.{n}": v for n, v in self._max.items()}

    def load_state_dict(self, state):
        self._max = {n[len("max."):]: v.clone() for n, v in state.items()}
