"""Continual TIES merging, two definitions.

``variant="seed"`` (default; SAIM paper, appendix C.3, "Continual TIES-Merging"):

    Δ_cum^(t) = Δ_cum^(t−1) + Trim_k(τ_t),  Δ_cum^(0) = 0,    deployed_t = θ0 + α Δ_cum^(t)

with Trim_k keeping the top-k fraction of |τ_t| (k = 0.2). The appendix does not state α; it says the
baselines use "the recommendations in their respective papers". The rule is task arithmetic over
trimmed vectors, so α defaults to task arithmetic's 0.3 (the value ``c-ta`` uses). TIES' own λ = 1
belongs with its disjoint *mean*, which this running sum does not have.

``variant="fusionbench"`` (the peer's continual TIES, FusionBench ``ContinualTiesMergingForCLIP``,
scaling_factor 0.5, threshold 20, merge_func "sum"):

    t = 1:  deployed_1 = θ0 + α τ_1                                   (τ_1 is not trimmed)
    t > 1:  deployed_t = previous + α TIES([M_{t−1}; τ_t])

where TIES trims each row of the stacked matrix (each row is one whole flattened task vector) to its
top-k, elects per element the sign of the sum of the trimmed rows, and sums the entries that agree
with the elected sign ("disjoint sum"). Adding it to ``previous`` counts M_{t−1} twice (once in
``previous``, once inside TIES); that is the peer's behaviour, kept as such. α defaults to 0.5.
Checked against FusionBench ``fusion_bench/method/opcm/ties_merging.py`` (``merged_model`` starts as a
copy of the pretrained model; step 0 uses the raw task vector; later steps stack
``merged_model − pretrained`` and ``task_model − pretrained``, call ``ties_merging(..., reset_thresh=20,
merge_func="sum")`` and set ``merged_param + scaling_factor · ties_merging_state_dict``) and
``fusion_bench/method/ties_merging/ties_merging_utils.py`` (``topk_values_mask`` with K = 20 → 0.2 per row,
``resolve_sign`` with the majority rule for zero sums, ``disjoint_merge`` "sum"). FusionBench's τ_t is
θ_t − θ0; here it is expert − start, the same thing under the ``independent`` protocol of ``c-ties-fb``.
Consequence: on the support of Trim(M_{t−1}) where the elected sign is M's own (almost everywhere, since |M|
dominates), M_t = (1 + α) M_{t−1} + α·(agreeing part of Trim τ_t); the top entries stay on top, so ‖M_t‖
grows about 1.5× per step (≈ 0.5·1.5^(T−1) ≈ 12.8 ‖τ‖ after 9 tasks, against ≈ 0.9 ‖τ‖ for task
arithmetic with α = 0.3), and the earliest tasks dominate; the model drifts far from θ0 on long streams.

Trim rule (both variants; the TIES reference code's ``topk_values_mask``): over d entries,
threshold = the (d − ⌊k·d⌋)-th smallest |x|, keep |x| ≥ threshold; so ⌊k·d⌋ + 1 entries survive plus
any ties at the threshold. Scope: ``trim_scope="global"`` (default) ranks all merged parameters of a
task vector together, as the paper's "top-k% entries of τ_t" and the reference code (which flattens the
whole checkpoint into one vector) do; ``"tensor"`` ranks each tensor on its own.

Rule table: TIES is element-wise, so every kind of tensor (``cl_merge.tensor_kinds``: q/k/v,
matrices, conv1, embeddings, biases, norms) takes the same rule, "trim" (``RULES``). Under the default
global scope how q/k/v are stored makes no difference (FusionBench flattens the whole checkpoint
too). Under ``trim_scope="tensor"`` open_clip's stacked ``in_proj_weight`` is ranked as one tensor
by default; ``qkv="split"`` ranks q, k and v on their own, as the d × d tensors of HF CLIP would be.

State: Δ_cum for the seed variant (one model-sized running sum); nothing for the FusionBench variant
(it reads M_{t−1} from ``previous``).

Streaming: the rule is per tensor; the global trim thresholds and the FusionBench majority sign are
whole-model reductions declared in ``plan`` (``cl_merge.reductions``: an exact k-th smallest |x| in two
histogram passes, a float64 vote total), so both variants run over either parameter store.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Literal, Optional

import torch

from cl_merge.merge_engine import MergePlan
from cl_merge.merger import Merger
from cl_merge.reductions import KthSmallestAbs, Total, kth_smallest_abs, trim_kth
from cl_merge.registry import register_merger
from cl_merge.tensor_kinds import Kind, map_blocks, rule_for

#: the rule of every kind (module doc); "trim_blocks" (q, k, v ranked on their own) with qkv="split"
RULES: Dict[Kind, str] = {k: "trim" for k in Kind}
SPLIT_RULES: Dict[Kind, str] = {**RULES, Kind.QKV: "trim_blocks"}

_DEFAULT_ALPHA = {"seed": 0.3, "fusionbench": 0.5}


def tensor_threshold(v: torch.Tensor, keep: float) -> Optional[torch.Tensor]:
    """The trim threshold of one tensor on its own (``trim_scope="tensor"``); None keeps everything."""
    kth = trim_kth(v.numel(), keep)
    return None if kth is None else v.detach().abs().float().reshape(-1).kthvalue(kth).values


def trim(v: torch.Tensor, threshold: Optional[torch.Tensor]) -> torch.Tensor:
    """Trim_k: zero every entry with |x| below the threshold (see the module docstring)."""
    return v if threshold is None else v * (v.abs().float() >= threshold.to(v.device))


def elected_sign(r_m: torch.Tensor, r_t: torch.Tensor) -> torch.Tensor:
    """sign(Σ trimmed rows) per entry (0 where the sum is 0)."""
    return torch.sign(r_m + r_t)


def disjoint_sum(rows, sign: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint sum (FusionBench ``disjoint_merge`` "sum"): entries whose elected sign is 0 take the
    all-parameter majority sign, then the entries that agree with the elected sign are summed."""
    sign = torch.where(sign == 0, majority.to(sign.dtype).to(sign.device), sign)
    total = torch.zeros_like(rows[0])
    for v in rows:
        # as the reference: elected sign > 0 keeps positive entries, otherwise negative ones
        total = total + v * torch.where(sign > 0, v > 0, v < 0)
    return total



def ties_disjoint_sum(rows, keep: float, scope: str = "global"):
    """TIES over N task vectors held in memory as name -> tensor dicts (all at once, e.g. DARE-TIES):
    trim each row (its own global threshold, or per tensor), elect sign(Σ trimmed rows) per entry,
    entries whose sum is 0 take the all-parameter majority sign, then the disjoint sum. The same
    primitives as the continual rule below."""
    def trimmed(row):
        if scope == "global":
            kth = trim_kth(sum(v.numel() for v in row.values()), keep)
            thr = None if kth is None else kth_smallest_abs(list(row.values()), kth)
            return {n: trim(v, thr) for n, v in row.items()}
        return {n: trim(v, tensor_threshold(v, keep)) for n, v in row.items()}

    rows = [trimmed(r) for r in rows]
    signs = {n: torch.sign(sum(r[n] for r in rows)) for n in rows[0]}
    majority = torch.sign(sum(s.sum(dtype=torch.float64) for s in signs.values()))
    return {n: disjoint_sum([r[n] for r in rows], signs[n], majority) for n in signs}

@register_merger
@dataclasses.dataclass
class TiesMerger(Merger):
    name = "ties"
    description = ("continual TIES: seed = θ0 + α·Σ Trim_k(τ_s) (α 0.3); "
                   "fusionbench = previous + α·TIES([M_{t−1}, τ_t]) (α 0.5)")
    variant: Literal["seed", "fusionbench"] = "seed"
    k: float = 0.2  # fraction of entries kept by the trim (the papers' "top-20%")
    alpha: Optional[float] = None  # None: the variant's default (seed 0.3, fusionbench 0.5)
    trim_scope: Literal["global", "tensor"] = "global"
    qkv: Literal["stacked", "split"] = "stacked"  # tensor scope only (module doc)

    def __post_init__(self):
        self.rules = SPLIT_RULES if self.qkv == "split" else RULES
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k is the kept fraction, in (0, 1]; got {self.k}")
        if self.alpha is None:
            self.alpha = _DEFAULT_ALPHA[self.variant]

    def tensor_state_keys(self):
        return ("sum",) if self.variant == "seed" else ()

    # ---- whole-model values ---------------------------------------------------------------------
    def plan(self, step, context):
        glob = self.trim_scope == "global"
        if self.variant == "seed":
            return MergePlan(reductions=[KthSmallestAbs("thr_t", lambda x: x.tau, keep=self.k)] if glob else [])
        if step == 1:
            return MergePlan()
        reductions = ([KthSmallestAbs("thr_m", self._m, keep=self.k),
                       KthSmallestAbs("thr_t", lambda x: x.tau, keep=self.k)] if glob else [])
        # the all-parameter majority sign: sign(Σ elected signs), float64 vote
        vote = Total("vote", lambda x: elected_sign(*self._trimmed_rows(x)).sum(dtype=torch.float64).cpu())
        return MergePlan(reductions=reductions + [vote])

    @staticmethod
    def _m(x):
        return torch.sub(x.previous, x.base)

    def _trimmed(self, x, key: str, v: torch.Tensor) -> torch.Tensor:
        """Trim_k of ``v``: the global threshold ``key``, or the tensor's own (block by block for a
        "trim_blocks" rule: q, k, v ranked on their own)."""
        if self.trim_scope == "global":
            return trim(v, x.reduced[key])
        if rule_for(x.name, v, self.rules) == "trim_blocks":
            return map_blocks(lambda b: trim(b, tensor_threshold(b, self.k)), v)
        return trim(v, tensor_threshold(v, self.k))

    def _trimmed_rows(self, x):
        return self._trimmed(x, "thr_m", self._m(x)), self._trimmed(x, "thr_t", x.tau)

    # ---- the per-tensor rule --------------------------------------------------------------------
    def merge_tensor(self, x):
        if self.variant == "seed":
            tau = x.tau
            total = x.state.get("sum", torch.zeros_like(x.base)) + self._trimmed(x, "thr_t", tau)
            x.new_state["sum"] = total
            return x.base + self.alpha * total
        if x.step == 1:
            return x.previous + self.alpha * x.tau
        r_m, r_t = self._trimmed_rows(x)
        update = disjoint_sum([r_m, r_t], elected_sign(r_m, r_t), torch.sign(x.reduced["vote"]))
        return x.previous + self.alpha * update
