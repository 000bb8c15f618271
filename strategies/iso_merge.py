"""Isotropic merging in the common subspace (ISO-C) and in common + task subspaces (ISO-CTS)
(Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging"; FusionBench
``fusion_bench/method/isotropic_merging``), all experts at once.

Rule table (δ_t = expert_t − θ0, T experts, r = min(m, n); merged weight θ0 + Δ):

=================  ======================================================================================
tensor             Δ
=================  ======================================================================================
matrix, ISO-C      Δ_TA = Σ_t δ_t = U Σ Vᵀ;  Δ = α · σ̄ · U Vᵀ with σ̄ = mean of all r singular values
matrix, ISO-CTS    c = r − round((r − ⌊f·r⌋)/T)·T common directions (f = ``common_space_fraction``),
                   s = (r − c)/T per task.  U_c Σ_c V_cᵀ = top-c SVD of Δ_TA;  per task the top-s SVD
                   of δ_t − U_c U_cᵀ δ_t;  stack the T·s task triplets and the c common ones into
                   U_all (m × r), σ_all (r), V_all (n × r);  orthonormalise U_all and V_all by their
                   polar factors;  Δ = α · mean(σ_all) · polar(U_all) polar(V_all)ᵀ
everything else    Δ = α · mean_t δ_t   (FusionBench averages every non-2-D tensor)
=================  ======================================================================================

The counts c and s are FusionBench's (``iso_cts``: the task-specific total is rounded to a multiple
of T). Defaults α = 1.0, f = 0.8: FusionBench's configs ``iso_c.yaml`` / ``iso_cts.yaml`` (the paper
tunes α on validation data).

Differences from FusionBench, all from the shared spectral kernel (``cl_merge.spectral``): the SVDs
come from the Gram matrix (float32 or float64 per matrix, see there), and null singular directions
(σ ≤ 10·ε·σ_max, whose singular vectors are arbitrary) get no weight: for a rank-deficient Δ_TA
FusionBench puts σ̄ on whatever directions LAPACK returns there, this puts nothing. On full-rank
matrices the result is the same formula.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from cl_merge.registry import register_merger
from cl_merge.multitask_merge import MultiTaskMerger, mean
from cl_merge.spectral import polar, truncated_svd


def iso_c_matrix(deltas: List[torch.Tensor]) -> torch.Tensor:
    """σ̄ · U Vᵀ of Δ_TA = Σ δ_t (before α)."""
    q, sigma = polar(torch.stack(deltas).sum(0), return_singular=True)
    return q * float(sigma.mean())


def iso_cts_split(r: int, tasks: int, fraction: float):
    """(common directions c, directions per task s), as FusionBench's ``iso_cts``."""
    common = int(r * fraction)
    task_total = round((r - common) / tasks) * tasks
    if task_total > r:  # rounding up past r (only when f·r < T/2): FusionBench would index out of range
        task_total -= tasks
    common = r - task_total
    return common, task_total // tasks


def iso_cts_matrix(deltas: List[torch.Tensor], fraction: float) -> torch.Tensor:
    """ISO-CTS on one matrix (before α)."""
    total = torch.stack(deltas).sum(0)
    r = min(total.shape)
    common, per_task = iso_cts_split(r, len(deltas), fraction)
    u_c, s_c, v_c = truncated_svd(total, common)
    us, ss, vs = [], [], []
    if per_task > 0:
        for d in deltas:
            residual = d - u_c @ (u_c.T @ d)  # remove the common subspace
            u, s, v = truncated_svd(residual, per_task)
            us.append(u), ss.append(s), vs.append(v)
    us.append(u_c), ss.append(s_c), vs.append(v_c)
    u_all, v_all = torch.cat(us, 1), torch.cat(vs, 1)
    if u_all.shape[1] == 0:
        return torch.zeros_like(total)
    # σ̄ over the r slots of FusionBench's stacked spectrum (dropped null directions count as 0)
    sigma_bar = float(torch.cat(ss).sum()) / r
    return sigma_bar * (polar(u_all) @ polar(v_all).T)


@register_merger
@dataclasses.dataclass
class IsoCMerger(MultiTaskMerger):
    """ISO-C: isotropic spectrum of the summed task vectors, α · σ̄ · U Vᵀ per matrix."""

    name = "iso_c"
    description = "ISO-C: per matrix α·σ̄·UVᵀ of Σ task vectors (flat spectrum); others α·mean"
    alpha: float = 1.0

    def merge_matrix(self, deltas, fishers=None, *, name=""):
        return self.alpha * iso_c_matrix(deltas)

    def merge_other(self, deltas, fishers=None, *, name=""):
        return self.alpha * mean(deltas)


@register_merger
@dataclasses.dataclass
class IsoCTSMerger(MultiTaskMerger):
    """ISO-CTS: common subspace of Σ δ_t plus each task's own directions outside it, isotropic."""

    name = "iso_cts"
    description = "ISO-CTS: common + per-task subspaces, orthonormalised, flat spectrum; others α·mean"
    alpha: float = 1.0
    common_space_fraction: float = 0.8

    def __post_init__(self):
        if not 0.0 <= self.common_space_fraction <= 1.0:
            raise ValueError(f"common_space_fraction must be in [0, 1]; got {self.common_space_fraction}")

    def merge_matrix(self, deltas, fishers: Optional[list] = None, *, name=""):
        return self.alpha * iso_cts_matrix(deltas, self.common_space_fraction)

    def merge_other(self, deltas, fishers=None, *, name=""):
        return self.alpha * mean(deltas)
