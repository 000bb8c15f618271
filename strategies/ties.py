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
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Literal, Optional

import torch

from cl_merge.merger import Merger
from cl_merge.params import StateDict, sub, zeros_like
from cl_merge.registry import register_merger
from cl_merge.tensor_kinds import Kind, map_blocks, rule_for

#: the rule of every kind (module doc); "trim_blocks" (q, k, v ranked on their own) with qkv="split"
RULES: Dict[Kind, str] = {k: "trim" for k in Kind}
SPLIT_RULES: Dict[Kind, str] = {**RULES, Kind.QKV: "trim_blocks"}

# Above this many entries the global threshold is found by bisection instead of one concatenated copy
# (a 3B-parameter language model would need 12 GB for the copy).
CONCAT_LIMIT = 1 << 27

_DEFAULT_ALPHA = {"seed": 0.3, "fusionbench": 0.5}


def _abs_bits(t: torch.Tensor) -> torch.Tensor:
    # For non-negative float32 values the int32 bit pattern orders like the value itself.
    return t.detach().abs().float().reshape(-1).view(torch.int32)


def kth_smallest_abs(tensors: List[torch.Tensor], k: int) -> torch.Tensor:
    """Exact k-th smallest |x| (1-based) over all entries of ``tensors``, as a float32 0-d tensor."""
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    if total <= CONCAT_LIMIT:
        flat = torch.cat([t.detach().abs().float().reshape(-1) for t in tensors])
        return flat.kthvalue(k).values
    # Bisection on the bit pattern: smallest b with #{bits ≤ b} ≥ k. 31 counting passes, O(1) extra memory.
    lo, hi = 0, 0x7F800000  # +inf
    while lo < hi:
        mid = (lo + hi) // 2
        count = sum(int((_abs_bits(t) <= mid).sum()) for t in tensors)
        if count >= k:
            hi = mid
        else:
            lo = mid + 1
    return torch.tensor([lo], dtype=torch.int32).view(torch.float32)[0]


def _threshold(tensors: List[torch.Tensor], keep: float) -> Optional[torch.Tensor]:
    """The trim threshold of ``topk_values_mask``; None when everything is kept."""
    d = sum(t.numel() for t in tensors)
    kth = d - int(d * keep)
    if kth <= 0 or d == 0:
        return None
    return kth_smallest_abs(tensors, kth)


def _trim_tensor(v: torch.Tensor, keep: float) -> torch.Tensor:
    thr = _threshold([v], keep)
    return v if thr is None else v * (v.abs().float() >= thr)


def trim(vector: StateDict, keep: float, scope: str, table=RULES) -> StateDict:
    """Trim_k: zero every entry below the top-``keep`` fraction of |x| (see the module docstring);
    ``table`` says which tensors the tensor scope ranks block by block."""
    if scope == "global":
        thr = _threshold(list(vector.values()), keep)
        if thr is None:
            return dict(vector)
        return {n: v * (v.abs().float() >= thr) for n, v in vector.items()}
    out = {}
    for n, v in vector.items():
        if rule_for(n, v, table) == "trim_blocks":
            out[n] = map_blocks(lambda b: _trim_tensor(b, keep), v)
        else:
            out[n] = _trim_tensor(v, keep)
    return out


def ties_disjoint_sum(rows: Iterable[StateDict], keep: float, scope: str, table=RULES) -> StateDict:
    """TIES over stacked task vectors (FusionBench ``ties_merging`` with merge_func="sum"):
    trim each row, elect sign(Σ trimmed rows) per entry, entries whose sum is 0 take the majority sign
    sign(Σ elected signs) over all parameters, then sum the entries that agree with the elected sign."""
    trimmed = [trim(r, keep, scope, table) for r in rows]
    names = list(trimmed[0])
    signs = {n: torch.sign(sum(r[n] for r in trimmed)) for n in names}
    majority = torch.sign(sum(s.sum(dtype=torch.float64) for s in signs.values()))
    out = {}
    for n in names:
        s = signs[n]
        s = torch.where(s == 0, majority.to(s.dtype), s)
        total = torch.zeros_like(trimmed[0][n])
        for r in trimmed:
            v = r[n]
            # as the reference: elected sign > 0 keeps positive entries, otherwise negative ones
            agree = torch.where(s > 0, v > 0, v < 0)
            total = total + v * agree
        out[n] = total
    return out


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

    def reset(self, base):
        self._sum: Dict[str, torch.Tensor] = zeros_like(base) if self.variant == "seed" else {}

    def merge(self, base, previous, expert, start, step):
        tau = sub(expert, start)
        if self.variant == "seed":
            for n, v in trim(tau, self.k, self.trim_scope, self.rules).items():
                self._sum[n] += v
            return {n: base[n] + self.alpha * self._sum[n] for n in base}
        if step == 1:
            update = tau
        else:
            update = ties_disjoint_sum([sub(previous, base), tau], self.k, self.trim_scope, self.rules)
        return {n: previous[n] + self.alpha * update[n] for n in previous}

    def state_dict(self):
        return {f"sum.{n}": v for n, v in self._sum.items()}

    def load_state_dict(self, state):
        if self.variant != "seed" and state:
            raise ValueError("the fusionbench variant keeps no state but a checkpoint holds some")
        self._sum = {n[len("sum."):]: v.clone() for n, v in state.items()}
