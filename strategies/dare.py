"""DARE: drop and rescale (Yu et al. 2024, "Language Models are Super Mario"; FusionBench
``fusion_bench/method/dare``), then task arithmetic or TIES, all experts at once.

Each task vector is sparsified at random before merging:

    δ̂_t = δ_t ⊙ m_t / (1 − p),    m_t ~ Bernoulli(1 − p) per entry (kept where u > p, u ~ U[0, 1))

with drop rate p (``drop_rate``, FusionBench's ``sparsity_ratio`` 0.5); without ``rescale`` the
1/(1 − p) factor is left out. With rescaling E[δ̂_t] = δ_t. Then:

* ``combine="task_arithmetic"`` (FusionBench ``DareTaskArithmetic``): Δ = α Σ_t δ̂_t, α = 0.3;
* ``combine="ties"`` (FusionBench ``DareTiesMerging``): Δ = α · TIES(δ̂_1 … δ̂_T) with TIES =
  trim each δ̂_t to its top-k fraction of |entries| (k = 0.2, FusionBench's ``threshold: 20``;
  over the whole model, ``trim_scope="global"``, as FusionBench flattens each checkpoint), elect
  signs, disjoint *sum* (FusionBench's ``merge_func: sum``), α = 0.5. The TIES math is
  ``strategies/ties.py``'s ``ties_disjoint_sum`` (the global trim threshold is a whole-model
  reduction).

Rule table: the drop applies to every tensor (FusionBench's ``only_on_linear_weights: false``) or
only to the matrices (``only_matrices``); then task arithmetic is per tensor (Δ = α Σ_t δ̂_t for
every tensor) and TIES is over the whole model.

Randomness (the reference uses the global torch generator, so its masks depend on everything drawn
before): the mask of task t (0-based, in the order of ``experts``) on tensor ``name`` comes from its own
generator seeded with a hash of (``seed``, t, name), so a merge is reproducible from ``seed`` alone
and does not depend on the order in which tensors are visited (streamed or in memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import List, Literal, Optional

import torch

from cl_merge.registry import register_merger
from cl_merge.multitask_merge import MultiTaskMerger, check_inputs, default_matrix, work_dtype
from cl_merge.strategies.ties import ties_disjoint_sum

_DEFAULT_ALPHA = {"task_arithmetic": 0.3, "ties": 0.5}


def mask_seed(seed: int, task: int, name: str) -> int:
    digest = hashlib.sha256(f"dare/{seed}/{task}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_drop(delta: torch.Tensor, drop_rate: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """δ ⊙ m / (1 − p) with m = [u > p], u ~ U[0, 1) drawn from ``generator``."""
    if drop_rate == 0.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=generator.device) > drop_rate
    out = delta * keep.to(delta.device)
    return out / (1.0 - drop_rate) if rescale else out


@register_merger
@dataclasses.dataclass
class DareMerger(MultiTaskMerger):
    """DARE (random drop + rescale, seeded) on top of task arithmetic or TIES."""

    name = "dare"
    description = "DARE: drop p of each task vector at random, rescale 1/(1−p), then TA (α 0.3) or TIES (α 0.5)"
    drop_rate: float = 0.5
    rescale: bool = True
    seed: int = 0
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    alpha: Optional[float] = None  # None: 0.3 for task arithmetic, 0.5 for TIES (FusionBench)
    k: float = 0.2  # TIES: fraction of entries kept by the trim
    trim_scope: Literal["global", "tensor"] = "global"
    only_matrices: bool = False

    def __post_init__(self):
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1); got {self.drop_rate}")
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k is the kept fraction, in (0, 1]; got {self.k}")
        if self.alpha is None:
            self.alpha = _DEFAULT_ALPHA[self.combine]

    def drop(self, deltas: List[torch.Tensor], name: str) -> List[torch.Tensor]:
        out = []
        for t, d in enumerate(deltas):
            gen = torch.Generator().manual_seed(mask_seed(self.seed, t, name))
            out.append(dare_drop(d, self.drop_rate, self.rescale, gen))
        return out

    def merge_matrix(self, deltas, fishers=None, *, name=""):
        return self.alpha * torch.stack(self.drop(deltas, name)).sum(0)

    def merge_other(self, deltas, fishers=None, *, name=""):
        dropped = deltas if self.only_matrices else self.drop(deltas, name)
        return self.alpha * torch.stack(list(dropped)).sum(0)

    def merge_all(self, base, experts, *, fishers=None, matrix=None, blocks=None):
        # the drop and both combinations are element-wise: q/k/v blocks change nothing (``blocks`` unused)
        if self.combine == "task_arithmetic":
            return super().merge_all(base, experts, fishers=fishers, matrix=matrix)
        check_inputs(base, experts, fishers, False, self.name)
        matrix = matrix or default_matrix
        rows = [{} for _ in experts]
        for name, b in base.items():
            dtype = work_dtype(b)
            deltas = [e[name].to(dtype) - b.to(dtype) for e in experts]
            if matrix(name, b) or not self.only_matrices:
                deltas = self.drop(deltas, name)
            for row, d in zip(rows, deltas):
                row[name] = d
        merged = ties_disjoint_sum(rows, self.k, self.trim_scope)
        return {n: (b.to(work_dtype(b)) + self.alpha * merged[n]).to(b.dtype) for n, b in base.items()}
