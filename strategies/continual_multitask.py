"""Continual variants of the multi-task mergers: ISO-C, ISO-CTS, TSV-M and EpiMer as per-tensor rules
of the one merge executor (``cl_merge.merge_engine``), so they run under the sequential and the
independent protocols over the in-memory and the on-disk parameter store (``docs/multitask-merging.md``,
"Continual variants").

At step t the deployed model is the all-at-once merger applied to the t task vectors seen so far,
computed from a state kept per tensor (τ_s = expert_s − start_s; under the independent protocol
start = θ0, so τ_s = δ_s and after T steps the result is the multitask merger on the same experts):

==========  ====================================================  ===============================
merger      per-tensor state after t steps                        grows with T?
==========  ====================================================  ===============================
c_iso_c     S = Σ τ_s (every tensor)                              no: one model-sized sum
c_iso_cts   matrices: every τ_s (t × m × n); others: S            yes: t task vectors per matrix
c_tsv_m     matrices: each task's rank-k factors U_s, σ_s, V_s     yes: (m + n + 1)·k·t per matrix
            (+ owner/block tags); others (and r < T): S
c_epimer    matrices: c_tsv_m's factors (float64 SVDs) + each     yes: (m + n + 1)·k·t + t·m·n
            task's Fisher diagonal F_s; others: S (nonmatrix
            "fisher": also Σ F_s τ_s and Σ F_s)
==========  ====================================================  ===============================

The growing states are the documented exception to the O(1)-state rule of ``cl_merge.merger``:
exact ISO-CTS needs every task's full matrix update, because the common subspace (the top-c SVD of
the running sum) moves as tasks arrive and each task's own directions are taken *outside* it; exact
EpiMer needs every task's full Fisher diagonal, because the whitened basis S moves as tasks arrive and
H̃_s = Sᵀ diag(F_s + ε) S cannot be updated from a projection onto an older S (only H̄ could, from
Σ F_s). The results record the state size per step (``merger_state_bytes``, docs/results-schema.md).

The rank per task is fixed by the run's number of tasks T (``MergeContext.tasks``): k = ⌊r/T⌋ by
default (TSV-M; EpiMer's k capped there), as the multitask merger over T experts uses, so the t·k
whitened atoms of step t fit and step T equals the multitask merge. Tensor kinds (q/k/v split,
matrices, the rest) follow the multitask rule table ``cl_merge.multitask_merge.RULES``.

``c_iso_c`` versus ``isotropic`` (SAIM's adaptive isotropic merge): ``isotropic`` recurses on its own
merged update, Δ_com = (1 + λ)(deployed_{t−1} − θ0) + (1 − λ) τ_t, and only partly flattens the
spectrum, σ̄ + (σ − σ̄)/√t; ``c_iso_c`` keeps the raw running sum of task vectors and fully flattens
it at every step (σ̄·UVᵀ of Σ τ_s, ISO-C's formula), so its step T is ISO-C on all experts.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, List, Literal, Optional

import torch

from cl_merge.components import PositiveInt, UnitInterval
from cl_merge.errors import UserError
from cl_merge.merge_engine import MergeContext, MergePlan
from cl_merge.merger import Merger
from cl_merge.multitask_merge import RULES, per_task_rank
from cl_merge.registry import register_merger
from cl_merge.spectral import truncated_svd
from cl_merge.strategies.epimer import check_settings, epimer_from_factors
from cl_merge.strategies.iso_merge import iso_c_matrix, iso_cts_matrix
from cl_merge.strategies.tsv_merge import TaskFactors, whiten
from cl_merge.tensor_kinds import join_qkv, rule_for, split_qkv


def kind_of(x) -> str:
    """"matrix", "blocks" (stacked q/k/v) or "other" (``RULES``)."""
    return rule_for(x.name, x.base, RULES)


def blocks_of(tensor: torch.Tensor, kind: str) -> List[torch.Tensor]:
    return list(split_qkv(tensor)) if kind == "blocks" else [tensor]


def joined(parts: List[torch.Tensor], kind: str) -> torch.Tensor:
    return join_qkv(*parts) if kind == "blocks" else parts[0]


def running_sum(x) -> torch.Tensor:
    """S_t = S_{t−1} + τ_t, kept as the per-tensor state ``sum``."""
    total = x.state["sum"] + x.tau if "sum" in x.state else x.tau.clone()
    x.new_state["sum"] = total
    return total


def total_tasks(x, who: str) -> int:
    tasks = x.context.tasks
    if tasks is None:
        raise UserError(f"{who} fixes each task's rank from the run's number of tasks; pass "
                        "MergeContext(tasks=T) (the protocol loop does)")
    if x.step > tasks:
        raise UserError(f"{who}: step {x.step} of a run declared with {tasks} tasks")
    return tasks


class ContinualMultiTask(Merger):
    """Shared parts: the protocols, and a per-step record of nothing by default."""

    protocols: ClassVar = ("sequential", "independent")
    #: how the per-tensor state grows with the number of tasks (docs/multitask-merging.md)
    state_growth: ClassVar[str] = "constant"


@register_merger
@dataclasses.dataclass
class ContinualIsoC(ContinualMultiTask):
    name = "c_iso_c"
    description = "continual ISO-C: α·σ̄·UVᵀ of the running sum of task vectors per matrix; others α·running mean"
    alpha: float = 1.0

    def tensor_state_keys(self):
        return ("sum",)

    def merge_tensor(self, x):
        total = running_sum(x)
        kind = kind_of(x)
        if kind == "other":
            return x.base + self.alpha * total / x.step
        return x.base + self.alpha * joined([iso_c_matrix([b]) for b in blocks_of(total, kind)], kind)


@register_merger
@dataclasses.dataclass
class ContinualIsoCTS(ContinualMultiTask):
    name = "c_iso_cts"
    description = ("continual ISO-CTS: keeps every task's matrix updates (grows with T), ISO-CTS of the "
                   "tasks seen; others α·running mean")
    state_growth = "linear: t task vectors per matrix"
    alpha: float = 1.0
    common_space_fraction: UnitInterval = 0.8

    def tensor_state_keys(self):
        return ("sum", "deltas")

    def merge_tensor(self, x):
        kind = kind_of(x)
        if kind == "other":
            return x.base + self.alpha * running_sum(x) / x.step
        new = x.tau[None]
        deltas = torch.cat([x.state["deltas"], new]) if "deltas" in x.state else new.clone()
        x.new_state["deltas"] = deltas
        per_block = zip(*[blocks_of(d, kind) for d in deltas])
        parts = [iso_cts_matrix(list(ds), self.common_space_fraction) for ds in per_block]
        return x.base + self.alpha * joined(parts, kind)


class FactorState:
    """Each task's rank-k factors of one tensor (one or three blocks), kept as per-tensor state:
    ``u`` (m_b × P), ``sigma`` (P), ``v`` (n_b × P), ``owner`` (P: the task of each atom) and ``block``
    (P: its q/k/v block), P = the atoms kept so far (≤ 3·k·t)."""

    KEYS = ("u", "sigma", "v", "owner", "block")

    @staticmethod
    def append(x, parts: List[torch.Tensor], k: int, policy) -> Dict[str, torch.Tensor]:
        new = {key: [] for key in FactorState.KEYS}
        task = x.step - 1
        for b, part in enumerate(parts):
            u, s, v = truncated_svd(part, k, policy)
            new["u"].append(u), new["sigma"].append(s), new["v"].append(v)
            new["owner"].append(torch.full((s.numel(),), task, dtype=torch.long))
            new["block"].append(torch.full((s.numel(),), b, dtype=torch.long))
        state = {}
        for key in FactorState.KEYS:
            dim = 1 if key in ("u", "v") else 0
            fresh = torch.cat(new[key], dim)
            state[key] = torch.cat([x.state[key].to(fresh.dtype), fresh], dim) if key in x.state else fresh
            x.new_state[key] = state[key]
        return state

    @staticmethod
    def of_block(state: Dict[str, torch.Tensor], b: int) -> TaskFactors:
        cols = state["block"] == b
        return TaskFactors(state["u"][:, cols], state["sigma"][cols], state["v"][:, cols], state["owner"][cols])


@register_merger
@dataclasses.dataclass
class ContinualTSV(ContinualMultiTask):
    name = "c_tsv_m"
    description = ("continual TSV-M: keeps each task's rank-k SVD factors (grows with T), whitens the "
                   "atoms seen, α·U⊥ΣV⊥ᵀ; others α·running mean")
    state_growth = "linear: (m + n + 1)·k per matrix per task"
    alpha: float = 1.0
    k: Optional[int] = None  # per-task rank; None: ⌊rank_fraction · r⌋
    rank_fraction: Optional[float] = None  # None: 1/T, T = the run's number of tasks

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1; got {self.k}")
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction <= 1.0:
            raise ValueError(f"rank_fraction must be in (0, 1]; got {self.rank_fraction}")

    def tensor_state_keys(self):
        return ("sum",) + FactorState.KEYS

    def merge_tensor(self, x):
        kind = kind_of(x)
        parts = blocks_of(x.tau, kind)
        k = 0 if kind == "other" else per_task_rank(parts[0].shape, total_tasks(x, self.name), self.k,
                                                    self.rank_fraction)
        if k == 0:  # not a matrix, or no room for one direction per task: the running mean
            return x.base + self.alpha * running_sum(x) / x.step
        state = FactorState.append(x, parts, k, "auto")
        out = []
        for b, part in enumerate(parts):
            f = FactorState.of_block(state, b)
            if f.sigma.numel() == 0:  # every task's update of this block is zero
                out.append(torch.zeros_like(part))
                continue
            f = whiten(f)
            out.append((f.u * f.sigma) @ f.v.T)
        return x.base + self.alpha * joined(out, kind)


@register_merger
@dataclasses.dataclass
class ContinualEpiMer(ContinualMultiTask):
    name = "c_epimer"
    description = ("continual EpiMer: keeps each task's rank-k factors and Fisher diagonal (grows with T), "
                   "EpiMer of the tasks seen (tagged coefficients)")
    state_growth = "linear: (m + n + 1)·k + m·n per matrix per task"
    needs_fisher = True
    k: int = 32
    alpha: float = 1.0
    eps: float = 1e-6
    eps_scale: Literal["relative", "absolute"] = "relative"
    aggregator: Literal["frechet_sum", "frechet_mean"] = "frechet_sum"
    nonmatrix: Literal["mean", "fisher"] = "mean"
    # how each expert's Fisher diagonal is estimated (cl_merge.fisher; the protocol computes and caches it,
    # the same cache entries as the multitask protocol's epimer)
    fisher_fraction: UnitInterval = 0.005
    fisher_min_samples: PositiveInt = 256

    def __post_init__(self):
        check_settings(self.k, self.eps)
        self.diagnostics: Dict[str, float] = {}

    def tensor_state_keys(self):
        return ("sum", "fisher_sum", "fisher_tau_sum", "fishers") + FactorState.KEYS

    def plan(self, step: int, context: MergeContext) -> MergePlan:
        self.diagnostics = {}
        return MergePlan()

    def after_pass(self, view) -> None:
        if self.diagnostics:  # η = cᵀH̄⁻¹c per matrix (strategies/epimer.py): the mean over matrices
            view.context.record["epimer_eta_mean"] = sum(self.diagnostics.values()) / len(self.diagnostics)

    def merge_tensor(self, x):
        if x.context.fisher is None:
            raise UserError(f"{self.name} needs the expert's Fisher diagonal (MergeContext.fisher); the protocol "
                            "loop computes it for mergers with needs_fisher")
        fisher = x.context.fisher[x.name].to(x.tau.dtype)
        kind = kind_of(x)
        parts = blocks_of(x.tau, kind)
        k = 0 if kind == "other" else per_task_rank(parts[0].shape, total_tasks(x, self.name), self.k, None)
        if k == 0:
            return x.base + self.merge_other(x, fisher)
        state = FactorState.append(x, parts, k, "float64")
        new = fisher[None]
        fishers = torch.cat([x.state["fishers"].to(new.dtype), new]) if "fishers" in x.state else new.clone()
        x.new_state["fishers"] = fishers
        per_block = list(zip(*[blocks_of(f, kind) for f in fishers]))
        out = []
        for b, part in enumerate(parts):
            name = f"{x.name}[{'qkv'[b]}]" if kind == "blocks" else x.name
            f = FactorState.of_block(state, b)
            if f.sigma.numel() == 0:
                out.append(torch.zeros_like(part))
                continue
            out.append(epimer_from_factors(f, list(per_block[b]), alpha=self.alpha, eps=self.eps,
                                           eps_scale=self.eps_scale, aggregator=self.aggregator,
                                           diagnostics=self.diagnostics, name=name))
        return x.base + joined(out, kind)

    def merge_other(self, x, fisher: torch.Tensor) -> torch.Tensor:
        """α·mean, or α·the Fisher-weighted average from running sums (Σ τ, Σ F, Σ F⊙τ: O(1))."""
        total = running_sum(x)
        if self.nonmatrix == "mean":
            return self.alpha * total / x.step
        f_sum = x.state["fisher_sum"] + fisher if "fisher_sum" in x.state else fisher.clone()
        ft_sum = x.state["fisher_tau_sum"] + fisher * x.tau if "fisher_tau_sum" in x.state else fisher * x.tau
        x.new_state["fisher_sum"], x.new_state["fisher_tau_sum"] = f_sum, ft_sum
        t = x.step
        f_mean = float(f_sum.double().mean()) / t
        jitter = self.eps * f_mean if self.eps_scale == "relative" and f_mean > 0 else self.eps
        # Σ_s (F_s + j) τ_s / Σ_s (F_s + j) = fisher_average with λ_s = 1/t (strategies/fisher_merge.py)
        return self.alpha * (ft_sum + jitter * total) / (f_sum + jitter * t)
