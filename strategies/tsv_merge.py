"""Task Singular Vectors merging, TSV-M (Gargiulo et al. 2025, Algorithm 1; FusionBench
``fusion_bench/method/task_singular_vector``, ``compute_and_sum_svd_mem_reduction``), all at once.

Rule table (δ_t = expert_t − θ0, T experts, r = min(m, n); merged weight θ0 + Δ):

===============  ========================================================================================
tensor           Δ
===============  ========================================================================================
matrix           per task the rank-k SVD δ_t ≈ U_t Σ_t V_tᵀ;  concatenate U = [U_1 … U_T] (m × Tk),
                 Σ = diag(Σ_1 … Σ_T), V = [V_1 … V_T];  Procrustes whitening: U_⊥ = polar(U),
                 V_⊥ = polar(V) (the nearest matrices with orthonormal columns, U_u V_uᵀ of U's SVD);
                 Δ = α · U_⊥ Σ V_⊥ᵀ
matrix, k = 0    (r < T: no room for one direction per task) Δ = α · mean_t δ_t
everything else  Δ = α · mean_t δ_t   (FusionBench averages every non-2-D tensor)
===============  ========================================================================================

Rank: ``k`` per task if set, else ⌊``rank_fraction``·r⌋, and ``rank_fraction`` = None means
FusionBench's 1/T (its ``sv_reduction``); both capped at ⌊r/T⌋ so the T·k whitened directions fit in
r dimensions. α = 1.0 (FusionBench's ``alpha: 1``; the EpiMer supplement's TSV-M rows use k = 32 and
α tuned per backbone, 0.7 on ViT-B/32).

Differences from FusionBench: the per-task SVDs and the polar factors come from the shared spectral
kernel (``cl_merge.spectral``: Gram matrix + eigh, float32 or float64 per matrix), null singular
directions are dropped, and only the T·k filled columns are whitened (FusionBench whitens an r-column
matrix whose unfilled columns are zero; they carry σ = 0 and change nothing).
"""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional

import torch

from cl_merge.registry import register_merger
from cl_merge.multitask_merge import MultiTaskMerger, mean, per_task_rank
from cl_merge.spectral import Policy, polar, truncated_svd


class TaskFactors(NamedTuple):
    """Concatenated per-task rank-k factors of one matrix: ``u`` (m × p), ``sigma`` (p), ``v``
    (n × p), and ``owner`` (p,) = the task each column (atom) belongs to."""

    u: torch.Tensor
    sigma: torch.Tensor
    v: torch.Tensor
    owner: torch.Tensor


def task_factors(deltas: List[torch.Tensor], k: int, policy: Policy = "auto") -> TaskFactors:
    us, ss, vs, owners = [], [], [], []
    for t, d in enumerate(deltas):
        u, s, v = truncated_svd(d, k, policy)
        us.append(u), ss.append(s), vs.append(v)
        owners.append(torch.full((s.numel(),), t, dtype=torch.long, device=s.device))
    return TaskFactors(torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1), torch.cat(owners))


def whiten(factors: TaskFactors) -> TaskFactors:
    """Procrustes whitening: U_⊥ = polar(U), V_⊥ = polar(V), same σ and owners."""
    return factors._replace(u=polar(factors.u), v=polar(factors.v))


def tsv_matrix(deltas: List[torch.Tensor], k: int) -> torch.Tensor:
    """U_⊥ Σ V_⊥ᵀ (before α); the mean when k = 0."""
    if k == 0:
        return mean(deltas)
    f = whiten(task_factors(deltas, k))
    return (f.u * f.sigma) @ f.v.T


@register_merger
@dataclasses.dataclass
class TSVMerger(MultiTaskMerger):
    """TSV-M: per-task rank-k singular vectors, Procrustes-whitened, summed."""

    name = "tsv_m"
    description = "TSV-M: per-task rank-k SVD factors, Procrustes-whitened, α·U⊥ΣV⊥ᵀ; others α·mean"
    alpha: float = 1.0
    k: Optional[int] = None  # per-task rank; None: ⌊rank_fraction · r⌋
    rank_fraction: Optional[float] = None  # None: 1/T (FusionBench)

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1; got {self.k}")
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction <= 1.0:
            raise ValueError(f"rank_fraction must be in (0, 1]; got {self.rank_fraction}")

    def rank(self, shape, tasks: int) -> int:
        return per_task_rank(shape, tasks, self.k, self.rank_fraction)

    def merge_matrix(self, deltas, fishers=None, *, name=""):
        return self.alpha * tsv_matrix(deltas, self.rank(deltas[0].shape, len(deltas)))

    def merge_other(self, deltas, fishers=None, *, name=""):
        return self.alpha * mean(deltas)
