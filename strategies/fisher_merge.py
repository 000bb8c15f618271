"""Fisher-weighted averaging (Matena & Raffel 2022; FusionBench
``fusion_bench/method/fisher_merging/fisher_merging.py``, ``merging_with_fisher_weights``), all at once.

    θ_m = Σ_t w_t (F_t + m) θ_t  /  Σ_t w_t (F_t + m)        per coordinate

with F_t the expert's Fisher diagonal (``cl_merge.fisher``), m = ``minimal_fisher_weight`` (1e-6,
guards coordinates where every F_t is 0) and w_t = λ_t ν_t: λ_t = 1/T and, with ``normalize`` (the
default, FusionBench's ``normalize_fisher_weight: true``), ν_t = (1/(‖F_t‖ + m)) / Σ_s 1/(‖F_s‖ + m),
‖F_t‖ the L2 norm of expert t's whole Fisher diagonal over all merged tensors (a whole-model
reduction, computed before the per-tensor rule). Without ``normalize``, ν_t = 1.

Rule table (every tensor the same rule; merged weight θ0 + Δ): Δ = Σ_t w_t (F_t + m) δ_t /
Σ_t w_t (F_t + m), δ_t = expert_t − θ0. Since the weights sum to one per coordinate this is exactly
the θ-form above; the δ-form keeps float32 rounding on the small updates instead of the large weights.
No scaling factor: the paper's method is a weighted average.

Where this differs from FusionBench: only in the Fisher itself (``cl_merge.fisher`` documents it —
FusionBench squares a per-batch summed gradient of Σ_c √p_c log p_c, this uses per-sample squared
gradients of the training loss) and in which examples it is computed on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch

from cl_merge.registry import register_merger
from cl_merge.components import PositiveInt, UnitInterval
from cl_merge.multitask_merge import MultiTaskMerger
from cl_merge.params import StateDict


def fisher_norm_weights(fishers: Sequence[StateDict], minimal: float) -> List[float]:
    """ν_t: FusionBench's normalisation, 1/(‖F_t‖ + m) normalised to sum to one."""
    inv = []
    for f in fishers:
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in f.values()))
        inv.append(1.0 / (norm + minimal))
    total = sum(inv)
    return [x / total for x in inv]


def fisher_average(deltas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                   weights: Sequence[float], minimal: float) -> torch.Tensor:
    """Σ_t w_t (F_t + m) δ_t / Σ_t w_t (F_t + m), per coordinate."""
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, f, w in zip(deltas, fishers, weights):
        wf = (f + minimal) * w
        num += wf * d
        den += wf
    return num / den


@register_merger
@dataclasses.dataclass
class FisherMerger(MultiTaskMerger):
    """Fisher-weighted averaging of the experts (per coordinate)."""

    name = "fisher"
    description = "Fisher-weighted averaging: Σ w_t F_t θ_t / Σ w_t F_t per coordinate (normalised F)"
    needs_fisher = True
    normalize: bool = True
    minimal_fisher_weight: float = 1e-6
    # how each expert's Fisher diagonal is estimated (cl_merge.fisher; the protocol computes and caches it)
    fisher_fraction: UnitInterval = 0.005  # of the task's training split
    fisher_min_samples: PositiveInt = 256

    def __post_init__(self):
        if not self.minimal_fisher_weight > 0.0:  # 0 would divide 0 by 0 where every F_t is 0
            raise ValueError(f"minimal_fisher_weight must be > 0; got {self.minimal_fisher_weight}")
        self._weights: Optional[List[float]] = None

    def prepare(self, base, experts, fishers):
        tasks = len(experts)
        if self.normalize:
            nu = fisher_norm_weights([{n: f[n] for n in base} for f in fishers], self.minimal_fisher_weight)
        else:
            nu = [1.0] * tasks
        self._weights = [v / tasks for v in nu]

    def merge_matrix(self, deltas, fishers=None, *, name=""):
        return self.merge_other(deltas, fishers, name=name)

    def merge_other(self, deltas, fishers=None, *, name=""):
        weights = self._weights if self._weights is not None else [1.0 / len(deltas)] * len(deltas)
        return fisher_average(deltas, fishers, weights, self.minimal_fisher_weight)
