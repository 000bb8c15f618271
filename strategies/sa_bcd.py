"""SA-BCD: sharpness-aware block coordinate descent (SAIM paper, Eq. 7–9 and Algorithm 1).

One step, two gradient evaluations (the learner's closure is called twice):

    g  = ∇L(Θ)
    m  ← β1 m + (1 − β1) g ;  v ← β2 v + (1 − β2) g²                     (Eq. 7, Alg. 1 l. 6, 11)
    Ω  = top-p fraction of |m|                                            (Alg. 1 l. 7)
    ε* = ρ g_Ω / ‖g_Ω‖₂   on Ω only, ‖·‖ over all parameters together      (Eq. 8)
    g′ = ∇L(Θ + ε*);  Θ restored (Θ + ε* − ε*: exact off Ω, within one rounding on Ω)
    Θ_i ← Θ_i − η · step_i  for i ∈ Ω;  Θ_i unchanged for i ∉ Ω            (Eq. 9)

Two readings of the update (``update``):

* ``"literal"`` — Eq. 9 / Alg. 1 l. 19 as printed: step = m̂/√(v̂ + ε) ⊙ g′, with m, v fed with g
  (the gradient at Θ) and Ω chosen from that m.
* ``"sam_adam"`` — the usual SAM + Adam reading: the moments are fed with g′ and the step is Adam's,
  step = m̂/(√v̂ + ε). Ω must be known before g′ exists (ε* lives on Ω), so it is chosen from the
  provisional momentum m̃ = β1 m_{t−1} + (1 − β1) g — Eq. 7's m_t with the gradient at Θ — which is
  not stored; the stored m, v are then updated with g′.

Implementation of the default reading (``"sam_adam"``, decay on Ω): Θ is copied before the
perturbation, torch's fused AdamW kernel runs the Adam step (moments of g′ on every coordinate,
decay and step) on that copy in one pass, and ``lerp(Θ + ε*, copy, 1_Ω)`` keeps it on Ω only —
exact at the 0/1 weights, so Θ off Ω is unchanged bit for bit and no restore pass is needed (the
unfused code, used for the other options and for dtypes/devices the kernel lacks, restores Θ by
subtracting ε*). ``benchmarks/perf/sa_bcd_step.py`` times it.

In both readings the moments of every coordinate are updated each step (Alg. 1 keeps full m, v);
only Θ is restricted to Ω. m̂, v̂ carry Adam's bias corrections (Alg. 1 l. 13).

Selection (``scope``): ``"tensor"`` (default) takes the top ⌈p·n⌉ entries of each parameter
tensor, so every layer keeps adapting and the budget does not depend on how gradient scales differ
between layers; ``"global"`` ranks all coordinates together, which lets layers with large gradients
(e.g. the last blocks) take most of it. Ties at the threshold go to the lower index, so exactly
⌈p·n⌉ coordinates are selected. The ε* norm is global in both scopes (Eq. 8 normalises g_Ω as one
vector).

Weight decay (``decay``): decoupled (AdamW's Θ ← Θ(1 − η·wd)), applied to Ω only by default —
Alg. 1 leaves every i ∉ Ω unchanged, and decaying all coordinates would move every parameter at
every step, undoing the sparse, small updates SA-BCD is meant to produce. ``decay="all"`` decays
every coordinate (AdamW's behaviour) for comparison.

Measured on the mini suite (order 1, all 9 tasks, the default budget: 100 steps/task, lr 3e-4,
batch 32; seed 0; SA-BCD experts merged by the default isotropic merge, i.e. strategy ``saim``;
ACC / BWT in %, "experts" = mean accuracy of each expert on its own task):

    update      scope    ACC    BWT     experts
    sam_adam    tensor   67.7   −10.5   86.7
    sam_adam    global   67.7    −9.9   86.8
    literal     tensor   59.3    −0.5   59.6
    literal     global   (not run: the reading barely moves the model under either scope)
    (Adam experts, same merge: ACC 69.1, BWT −10.8, experts 87.2)

Zero-shot mean accuracy is 59.3. ``sam_adam`` is the default: the literal reading multiplies Adam's
normalised direction m̂/√(v̂ + ε) (entries of order 1) by g′ itself, so a step is |g′| (here
~1e-3–1e-2) times smaller than Adam's at the same learning rate; with the shared budget its experts
stay at the zero-shot level (59.6 vs 59.3) and the merge has nothing to keep (BWT ≈ 0 only because
nothing was learnt). It would need a learning rate ~100–1000× larger, i.e. a different budget from
every other learner's.

Scope: per tensor (default) vs global give the same ACC on mini (67.7 both; BWT −10.5 vs −9.9,
experts 86.7 vs 86.8: within one seed's noise). The paper's "top p% of parameters" reads as global;
per tensor stays the default because it measures the same here, keeps every layer adapting whatever
the gradient scale of its neighbours, and costs one partition per tensor instead of one over all
parameters at every step (88M entries on ViT-B/32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Literal, Optional

import numpy as np
import torch

from cl_merge.learner import GradientLearner
from cl_merge.registry import register_learner

Update = Literal["literal", "sam_adam"]
Scope = Literal["tensor", "global"]
Decay = Literal["selected", "all"]


def selection_size(p: float, n: int) -> int:
    """How many of ``n`` coordinates a top-``p`` selection keeps: ⌈p·n⌉ (so at least a fraction p,
    and at least one), with a little slack for p·n that floating point puts just above an integer."""
    return min(n, max(1, math.ceil(p * n - 1e-9)))


def top_mask_into(score: torch.Tensor, k: int, out: torch.Tensor,
                  work: Optional[np.ndarray] = None) -> torch.Tensor:
    """Write into ``out`` the 0/1 mask of the k entries of largest |score| (ties at the threshold go
    to the lower index) and return it.

    On CPU, numpy's introselect (``np.partition``) finds the threshold: ~10× faster than
    ``torch.kthvalue``/``topk`` here; elsewhere (CUDA) ``exact_top_k``, the same set. ``work`` (float, ≥ 2·numel) is reused across calls: fresh
    multi-MB buffers each step cost page faults that dominate on large models."""
    n = score.numel()
    if k >= n:
        return out.fill_(1.0)
    if score.device.type == "cpu" and score.dtype in (torch.float32, torch.float64) and out.is_contiguous():
        x = score.detach().reshape(-1).numpy()
        if work is None or work.dtype != x.dtype or work.size < 2 * n:
            work = np.empty(2 * n, dtype=x.dtype)
        a, part = work[:n], work[n:2 * n]
        np.abs(x, out=a)
        np.copyto(part, a)
        part.partition(n - k)
        threshold = part[n - k]
        keep = out.view(-1).numpy()
        np.greater_equal(a, threshold, out=keep, casting="unsafe")
        # more than k selected only if an entry below the k-th position equals the threshold
        if part[:n - k].max() == threshold:  # ties at the threshold: drop the highest-index ones
            extra = int(np.count_nonzero(keep)) - k
            ties = np.flatnonzero(a == threshold)
            keep[ties[ties.size - extra:]] = 0.0
        return out
    return out.copy_(exact_top_k(score, k).view_as(out))


def exact_top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (flat) of the k entries of largest |score|, ties at the threshold to the lower
    index, with torch ops on ``score``'s device (CUDA; ``torch.topk`` leaves the tie order
    unspecified): the threshold is the k-th largest |score| (``kthvalue``), everything above it is
    kept, and of the entries equal to it the first k − #above (a cumulative count)."""
    a = score.detach().abs().reshape(-1)
    n = a.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    threshold = a.kthvalue(n - k + 1).values  # k-th largest = (n − k + 1)-th smallest
    above = a > threshold
    tied = a == threshold
    room = k - above.sum()
    return above | (tied & (tied.cumsum(0) <= room))


def top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (``score``'s dtype) of the k entries of largest |score|; see ``top_mask_into``."""
    return top_mask_into(score, k, torch.empty_like(score, memory_format=torch.contiguous_format))


class SABCD(torch.optim.Optimizer):
    """Algorithm 1 of the SAIM paper as a ``torch.optim.Optimizer``; ``step`` needs the closure.

    Per parameter it keeps m, v, a work buffer and the 0/1 mask of Ω; every step runs in place on
    them (large fresh tensors each step cost more in page faults than the arithmetic)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 rho: float = 0.05, p: float = 0.3, update: Update = "sam_adam", scope: Scope = "tensor",
                 decay: Decay = "selected"):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p (selected fraction) must be in (0, 1]; got {p}")
        if rho < 0.0:
            raise ValueError(f"rho must be >= 0; got {rho}")
        if update not in ("literal", "sam_adam") or scope not in ("tensor", "global") \
                or decay not in ("selected", "all"):
            raise ValueError(f"unknown SA-BCD option: update={update}, scope={scope}, decay={decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rho, self.p, self.update, self.scope, self.decay = rho, p, update, scope, decay
        self._work: Optional[np.ndarray] = None  # numpy scratch for the selection
        self._flat: Optional[torch.Tensor] = None  # global scope: all scores, then all masks

    # ---- selection ----------------------------------------------------------------------------
    def _select(self, scores: List[torch.Tensor], masks: List[torch.Tensor]) -> None:
        """Ω into ``masks`` (0/1, one per tensor): the top-p fraction of |score|."""
        if self.scope == "tensor":
            for s, m in zip(scores, masks):
                if self._work is None or self._work.size < 2 * s.numel():
                    self._work = np.empty(2 * max(x.numel() for x in scores), dtype=np.float32)
                top_mask_into(s, selection_size(self.p, s.numel()), m,
                              self._work if s.dtype == torch.float32 else None)
            return
        sizes = [s.numel() for s in scores]
        if self._flat is None or self._flat.numel() != 2 * sum(sizes):
            self._flat = torch.empty(2 * sum(sizes), dtype=scores[0].dtype, device=scores[0].device)
            self._work = None
        flat, flat_mask = self._flat[:sum(sizes)], self._flat[sum(sizes):]
        torch.cat([s.reshape(-1) for s in scores], out=flat)
        if self._work is None and flat.dtype == torch.float32 and flat.device.type == "cpu":
            self._work = np.empty(2 * flat.numel(), dtype=np.float32)
        top_mask_into(flat, selection_size(self.p, flat.numel()), flat_mask, self._work)
        for m, part in zip(masks, flat_mask.split(sizes)):
            m.copy_(part.view_as(m))

    # ---- one step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if closure is None:
            raise RuntimeError("SA-BCD evaluates the gradient twice per step: pass the closure")
        with torch.enable_grad():
            loss = closure()  # g = ∇L(Θ)
        groups = []  # (group, params, state dicts) for the parameters that received a gradient
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                groups.append((group, params, [self._state(p) for p in params]))
        if not groups:
            return loss
        # foreach ops over each group's tensors keep the per-tensor Python overhead low (small models)
        scores = []
        for group, params, states in groups:
            b1, b2 = group["betas"]
            grads = [p.grad for p in params]
            m = [st["exp_avg"] for st in states]
            if self.update == "literal":  # moments from g; Ω from this m (Alg. 1 l. 6, 7, 11)
                v = [st["exp_avg_sq"] for st in states]
                torch._foreach_lerp_(m, grads, 1.0 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
                scores += m
            else:  # provisional m̃ = β1 m + (1 − β1) g selects; m, v are fed with g′ below
                for mi, g, st in zip(m, grads, states):
                    scores.append(torch.lerp(mi, g, 1.0 - b1, out=st["work"]))
        all_params = [p for _, params, _ in groups for p in params]
        masks = [st["mask"] for _, _, states in groups for st in states]
        self._select(scores, masks)  # 1 on Ω, 0 elsewhere
        del scores

        # ε* = ρ g_Ω / ‖g_Ω‖₂ over all parameters (Eq. 8). g is not needed afterwards, so g_Ω is
        # formed in place; Θ is restored by subtracting ε* again: exact off Ω (ε* = 0 there), within
        # one rounding on Ω, whose coordinates the update then moves anyway.
        g_sel = [p.grad for p in all_params]
        torch._foreach_mul_(g_sel, masks)
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g_sel))))
        scale = self.rho / norm if norm > 0.0 else 0.0
        fused = self._fusable(groups)
        if fused:  # keep Θ in "work" (the scores are no longer needed): the fused update starts from it
            saved = [st["work"] for _, _, states in groups for st in states]
            torch._foreach_copy_(saved, all_params)
        if scale:
            torch._foreach_add_(all_params, g_sel, alpha=scale)
        with torch.enable_grad():
            closure()  # g′ = ∇L(Θ + ε*)
        if fused:  # no restore: Θ + ε* = Θ exactly off Ω, and Ω is overwritten below
            del g_sel
            self._fused_update(groups, masks, saved)
            return loss
        if scale:
            torch._foreach_add_(all_params, g_sel, alpha=-scale)
        del g_sel

        offset = 0
        for group, params, states in groups:
            mask = masks[offset:offset + len(params)]
            offset += len(params)
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            g2 = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            m = [st["exp_avg"] for st in states]
            v = [st["exp_avg_sq"] for st in states]
            denom = [st["work"] for st in states]
            t = states[0]["step"] + 1
            for st in states:
                st["step"] = t
            bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
            # per-tensor ops with out= where foreach would allocate: one pass each, no new buffers
            if self.update == "literal":  # Eq. 9: m̂/√(v̂ + ε) ⊙ g′
                for vi, d in zip(v, denom):
                    torch.mul(vi, 1.0 / bc2, out=d)
                torch._foreach_add_(denom, eps)
                torch._foreach_sqrt_(denom)
                torch._foreach_mul_(g2, m)  # g′ is not needed afterwards: m ⊙ g′ in its place
                torch._foreach_div_(g2, denom)
            else:  # Adam with moments of g′: m̂/(√v̂ + ε)
                torch._foreach_lerp_(m, g2, 1.0 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g2, g2, value=1.0 - b2)
                for vi, d in zip(v, denom):
                    torch.sqrt(vi, out=d)
                torch._foreach_mul_(denom, 1.0 / math.sqrt(bc2))
                torch._foreach_add_(denom, eps)
                for mi, d, g in zip(m, denom, g2):
                    torch.div(mi, d, out=g)  # g′ is not needed afterwards
            direction = g2
            if wd != 0.0:  # decoupled decay: on Ω only (p ← p − η·wd·1_Ω·p), unless decay="all"
                if self.decay == "all":
                    torch._foreach_mul_(params, 1.0 - lr * wd)
                else:
                    torch._foreach_addcmul_(params, mask, params, value=-lr * wd)
            torch._foreach_addcmul_(params, mask, direction, value=-lr / bc1)  # Θ_Ω ← Θ_Ω − η·(…)_Ω
        return loss

    # ---- the default reading's update in one fused pass ---------------------------------------
    def _fusable(self, groups) -> bool:
        """Whether torch's fused AdamW kernel can run the update (``"sam_adam"``, decay on Ω only,
        one floating dtype and device per group, a device the kernel supports)."""
        if self.update != "sam_adam" or self.decay != "selected" or not hasattr(torch, "_fused_adamw_"):
            return False
        for _, params, _ in groups:
            kinds = {(p.dtype, p.device) for p in params}
            if len(kinds) != 1:
                return False
            dtype, device = kinds.pop()
            if device.type not in ("cpu", "cuda") or dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return False
        return True

    def _fused_update(self, groups, masks, saved) -> None:
        """Adam with moments of g′ on every coordinate, Θ moved on Ω only (Eq. 9):

            m, v ← Adam's moments of g′;  Θ̃ = AdamW(Θ) (decay and step everywhere, one fused pass,
            on ``saved``, the copy of Θ taken before the perturbation)
            Θ ← lerp(Θ + ε*, Θ̃, 1_Ω)

        ``lerp`` is exact at weights 0 and 1: off Ω it returns Θ + ε* = Θ (ε* is exactly 0 there)
        bit for bit, on Ω it returns Θ̃_i = Θ_i(1 − η·wd) − η·m̂_i/(√v̂_i + ε), the unfused code's
        update (which restores Θ by subtracting ε*, within one rounding on Ω)."""
        offset = 0
        for group, params, states in groups:
            mask = masks[offset:offset + len(params)]
            old = saved[offset:offset + len(params)]
            offset += len(params)
            b1, b2 = group["betas"]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            t = states[0]["step"] + 1
            for st in states:
                st["step"] = t
            step = torch.full((), float(t), dtype=torch.float32, device=params[0].device)
            torch._fused_adamw_(old, grads, [st["exp_avg"] for st in states],
                                [st["exp_avg_sq"] for st in states], [], [step] * len(params),
                                lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                                eps=group["eps"], amsgrad=False, maximize=False)
            torch._foreach_lerp_(params, old, mask)

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["work"] = torch.empty_like(p, memory_format=torch.contiguous_format)
            st["mask"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return st


@register_learner
@dataclasses.dataclass
class SABCDLearner(GradientLearner):
    """SA-BCD fine-tuning (SAIM Alg. 1), cosine schedule and decoupled weight decay 0.01 from
    ``GradientLearner``. ``p`` = selected fraction, ``rho`` = ρ; see the module doc for ``update``,
    ``scope`` and ``decay``."""

    name = "sa_bcd"
    description = "SA-BCD (SAIM): top-p momentum selection, sharpness-aware step on the selected coordinates"
    rho: float = 0.05
    p: float = 0.3
    update: Update = "sam_adam"
    scope: Scope = "tensor"
    decay: Decay = "selected"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must be in (0, 1]; got {self.p}")
        if self.rho < 0.0:
            raise ValueError(f"rho must be >= 0; got {self.rho}")

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return SABCD(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                     weight_decay=self.weight_decay, rho=self.rho, p=self.p, update=self.update,
                     scope=self.scope, decay=self.decay)
