"""Adaptive isotropic merging (SAIM paper, Eq. 10–12 and Algorithm 2).

Per step t, with θ0 = ``base``, Δ_cum = previous − θ0 and Δ_T = expert − start:

    Δ_com    = (1 + λ) Δ_cum + (1 − λ) Δ_T                              (Eq. 10)
    matrices: U Σ Vᵀ = SVD(Δ_com),  σ̄ = mean(Σ),  Σ̂ = σ̄ + (Σ − σ̄)/√t     (Eq. 11)
              Δ_merged = U Σ̂ Vᵀ
    others:   Δ_merged = ((t − 1) Δ_cum + (expert − θ0)) / t             (running mean, ISO-C)
    deployed = θ0 + α Δ_merged                                           (Eq. 12)

Rule table (which tensors are matrices; ``cl_merge.tensor_kinds`` decides each tensor's kind):

===============  ========================================  =====================  ==================
kind             open_clip image tower                     ``preset="default"``   ``"fusionbench"``
===============  ========================================  =====================  ==================
qkv              ``attn.in_proj_weight`` (3d × d)           Eq. 11 on q, k, v      Eq. 11 on q, k, v
matrix           ``out_proj``, ``c_fc``, ``c_proj``,        Eq. 11                 Eq. 11
                 ``proj``
positional       ``positional_embedding`` (2-D)             Eq. 11                 Eq. 11
conv             ``conv1.weight`` (patch embedding)         running mean (1)       running mean
embedding        ``class_embedding``                        running mean           running mean
bias, norm       ``*.bias``, ``in_proj_bias``, ``ln_*``     running mean           running mean
===============  ========================================  =====================  ==================

(1) chosen by measurement (conv1 paragraph below; ``CONV_DEFAULT``).

``preset="eq10"`` is Eq. 10 read literally for every tensor (the paper is silent on non-2-D
tensors): stacked q/k/v, every non-matrix tensor (conv1 included) summed as Δ_com. Options
override one row of the chosen preset: ``qkv`` = ``split`` | ``stacked`` (one SVD of the 3d × d
matrix), ``non_matrix`` = ``mean`` | ``sum`` (Eq. 10), ``conv`` = ``elementwise`` (the
``non_matrix`` rule) | ``matrix`` (reshaped to (out, in·k·k), then Eq. 11).

Why these defaults. The reference code this merge builds on (ISO-C, FusionBench's
``isotropic_merging/iso_utils.py``) runs on Hugging Face CLIP: q, k, v are three d × d matrices and
every tensor that is not 2-D is averaged over the tasks (only 2-D tensors are summed and made
isotropic; the position embedding is 2-D there too). ``"fusionbench"`` is exactly that tensor
handling on an open_clip tower (converted from HF weights or not). Summing non-matrix tensors with
α = 1 adds all T task updates in full: on the mini suite (tasks = input domains, order 1) that is
ACC 58.8 for adam + isotropic and 60.5 for SAIM (preset "eq10") against 69.1 and 67.7 with the
running mean; the patch embedding carries most of it (averaging conv1 alone, q/k/v stacked: 70.5).

The running mean in the continual protocol. ISO-C averages the T task vectors at once; here it is
kept without any list of past updates: Δ_merged,t = ((t − 1) Δ_cum + (expert_t − θ0))/t reads
Δ_cum = M_{t−1} off ``previous``, so the state stays O(1) (none at all). Under the independent
protocol (start = θ0, α = 1) this is exactly mean_{s≤t} τ_s; under the sequential protocol
expert_t − θ0 = M_{t−1} + τ_t, so it is the running mean of the task models (SWA on these tensors):
M_t = M_{t−1} + τ_t / t. λ does not enter the mean (ISO-C has none); α scales it as Eq. 12 does, and
with α ≠ 1 it compounds through Δ_cum like every other tensor (Algorithm 2 line 8).

conv1: "as matrix" (reshaped to (out, in·k·k), Eq. 11) vs "non-matrix" (running mean), measured on
the mini suite (9 tasks, seed 0, independent experts, every other row at the default; ACC / BWT in %):

    merger                       conv1 rule     order 1        order 2        mean
    adam + isotropic             running mean   69.1 / −10.8   69.4 / −12.0   69.2 / −11.4
    adam + isotropic             as matrix      68.9 / −12.5   68.3 / −15.1   68.6 / −13.8
    saim (SA-BCD + isotropic)    running mean   67.7 / −10.5   67.8 / −12.8   67.8 / −11.7
    saim (SA-BCD + isotropic)    as matrix      67.6 / −12.2   66.4 / −16.2   67.0 / −14.2
    (preset "eq10": conv1 and every other non-matrix tensor summed: adam 58.8 / 56.4, saim 60.5 / 58.2)

The running mean wins on both orders for both learners, so it is the default (``CONV_DEFAULT``),
which also makes ``"default"`` and ``"fusionbench"`` the same table. q/k/v split vs stacked (order 1):
adam 69.1 vs 69.4, saim 67.7 vs 68.1 — within noise on this 3-layer model; split is the default
because it is the decomposition the reference implementations use.

Defaults λ = 0, α = 1.0 (the paper's vision setting). The merger keeps no state: Δ_cum is read off
``previous`` (so it includes the α of earlier steps, as in Algorithm 2 line 8) and t is ``step``.

How the spectrum is reshaped without a per-matrix SVD. With c = 1/√t, Σ̂ = cΣ + (1 − c)σ̄, so
U Σ̂ Vᵀ = A · V diag(σ̂/σ) Vᵀ for A = Δ_com (m ≥ n; for m < n the mirror image U diag(σ̂/σ) Uᵀ · A):
V and σ² come from the eigendecomposition of the small Gram matrix AᵀA (n × n), and the result is one
matmul with the n × n operator V diag(σ̂/σ) Vᵀ. The Gram matrix squares the condition number κ, so
its precision is chosen per matrix:

* float32 (Gram, eigh, product) when ε32·κ² ≤ ``FAST_PATH_BOUND`` = 1e-5 — the relative error it can
  leave on the smallest singular value. Random and other well-conditioned rectangular matrices (the
  attention and MLP weights of a ViT tower: κ ≈ 3–4) take this route. A Cholesky factorisation with
  a few inverse/power iterations estimates κ first, and the eigenvalues confirm it;
* float64 throughout otherwise (square or ill-conditioned matrices, e.g. real fine-tuning updates
  with a decaying spectrum): error ~ε64·κ², below a float32 SVD's for κ up to ~1e4. (A float32
  final product would not do: the rounded operator has norm ~σ̄/σ_min, so its error grows like
  ε32·κ in every direction, ~1e-4 on square random matrices.)

So the result is at least as exact as a plain float32 SVD (measured against a float64 SVD) and
cheaper, mostly on the well-conditioned matrices; eigh runs one matrix at a time (torch's batched
CPU eigh oversubscribes threads badly on a loaded machine).
Timings and errors: ``benchmarks/perf/isotropic_merge.py``.

Null directions. Singular directions with σ_i ≤ 10·ε(dtype)·σ_max carry no signal: their singular
vectors are arbitrary (any orthonormal completion is a valid SVD), so Eq. 11 would add σ̂_i = (1 − c)σ̄
along an arbitrary direction. We drop them (the merged update stays inside the row and column spaces
of Δ_com), while σ̄ still averages over all r = min(m, n) singular values as Eq. 11 writes. On
full-rank matrices this is exactly U Σ̂ Vᵀ. At t = 1, Σ̂ = Σ and Δ_merged = Δ_com without any
decomposition.

Choosing α on validation data (``alpha_grid``, off by default): the paper picks α by "validation set
search". The merger has no data access; the merge context carries ``validation_score(state) -> float``
(accuracy on the current task's validation split, from the protocol loop). With a grid the rule's
output is Δ_merged (spooled), ``after_pass`` scores θ0 + aΔ_merged for every grid value a, and a
finalizing pass writes θ0 + αΔ_merged; the chosen α goes to the step's merge record
(``chosen_alpha`` in the results). This runs over either parameter store.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Callable, Dict, Literal, Optional, Tuple

import torch

from cl_merge.merge_engine import MergePlan
from cl_merge.merger import Merger
from cl_merge.numerics import FAST_PATH_BOUND, float32_suffices, null_tolerance  # noqa: F401  (re-exported)
from cl_merge.registry import register_merger
from cl_merge.spectral import float32_may_do
from cl_merge.tensor_kinds import Kind, flatten_conv, map_blocks, rule_for


def spectrum_factors(sigma: torch.Tensor, t: int, rank: int, rtol: float) -> torch.Tensor:
    """σ̂/σ for Eq. 11 given the min(m, n) singular values ``sigma`` (σ̄ averages all of them);
    0 on null directions."""
    c = 1.0 / math.sqrt(t)
    mean = sigma.sum() / rank
    keep = sigma > rtol * sigma.max()
    return torch.where(keep, c + (1.0 - c) * mean / torch.where(keep, sigma, 1.0), 0.0)


def isotropic_matrix(mat: torch.Tensor, t: int, rtol: Optional[float] = None) -> torch.Tensor:
    """Eq. 11 on one matrix: U (σ̄ + (Σ − σ̄)/√t) Vᵀ, via the Gram matrix (module doc)."""
    if t == 1:
        return mat.clone()  # Σ̂ = Σ
    dtype = mat.dtype
    rtol = null_tolerance(dtype) if rtol is None else rtol
    wide = mat.shape[0] < mat.shape[1]
    a = mat.T if wide else mat  # work with the smaller Gram matrix (A Aᵀ when wide)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    a = a.to(work)
    lam = vec = None
    if work == torch.float32:
        gram = a.T @ a
        if float32_may_do(gram):
            lam, vec = torch.linalg.eigh(gram)
            if not (lam[0] > 0 and float32_suffices(float(lam[-1] / lam[0]))):
                lam = vec = None
    if lam is None:  # float64 throughout: Gram, eigh and the product
        a = a.double()
        lam, vec = torch.linalg.eigh(a.T @ a)
    sigma = lam.double().clamp_min(0.0).sqrt()
    phi = spectrum_factors(sigma, t, sigma.numel(), rtol).to(vec.dtype)
    out = a @ ((vec * phi) @ vec.T)  # A · V diag(σ̂/σ) Vᵀ
    return (out.T if wide else out).to(dtype)


#: conv1's default rule, chosen by measurement on the mini suite (module doc, CONV_MEASUREMENT)
CONV_DEFAULT = "mean"

#: rule tables (module doc). Rules: "spectral" (Eq. 11), "spectral_blocks" (Eq. 11 on each of q, k,
#: v), "spectral_flat" (Eq. 11 on the kernel reshaped to (out, in·k·k)), "mean" (running mean),
#: "sum" (Δ_com as Eq. 10 gives it)
PRESETS: Dict[str, Dict[Kind, str]] = {
    "default": {Kind.QKV: "spectral_blocks", Kind.MATRIX: "spectral", Kind.POSITIONAL: "spectral",
                Kind.CONV: CONV_DEFAULT, Kind.EMBEDDING: "mean", Kind.NORM: "mean", Kind.BIAS: "mean",
                Kind.OTHER: "mean"},
    "fusionbench": {Kind.QKV: "spectral_blocks", Kind.MATRIX: "spectral", Kind.POSITIONAL: "spectral",
                    Kind.CONV: "mean", Kind.EMBEDDING: "mean", Kind.NORM: "mean", Kind.BIAS: "mean",
                    Kind.OTHER: "mean"},
    "eq10": {Kind.QKV: "spectral", Kind.MATRIX: "spectral", Kind.POSITIONAL: "spectral",
             Kind.CONV: "sum", Kind.EMBEDDING: "sum", Kind.NORM: "sum", Kind.BIAS: "sum", Kind.OTHER: "sum"},
}
_ELEMENTWISE = (Kind.CONV, Kind.EMBEDDING, Kind.NORM, Kind.BIAS, Kind.OTHER)


def rule_table(preset: str = "default", qkv: Optional[str] = None, non_matrix: Optional[str] = None,
               conv: Optional[str] = None) -> Dict[Kind, str]:
    """The preset's table with the options' rows replaced (module doc)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown isotropic preset {preset!r}; choose one of {', '.join(PRESETS)}")
    table = dict(PRESETS[preset])
    if qkv is not None:
        table[Kind.QKV] = {"split": "spectral_blocks", "stacked": "spectral"}[qkv]
    if non_matrix is not None:
        conv_rule = table[Kind.CONV]
        for kind in _ELEMENTWISE:
            table[kind] = non_matrix
        if conv_rule == "spectral_flat":
            table[Kind.CONV] = conv_rule
    if conv is not None:
        table[Kind.CONV] = "spectral_flat" if conv == "matrix" else table[Kind.OTHER]
    return table


def isotropic_tensor(rule: str, com: torch.Tensor, t: int, rtol: Optional[float] = None) -> torch.Tensor:
    """Δ_merged of one tensor under a spectral or "sum" rule, from its Δ_com."""
    if rule == "sum":
        return com
    if rule == "spectral":
        return isotropic_matrix(com, t, rtol)
    if rule == "spectral_blocks":
        return map_blocks(lambda b: isotropic_matrix(b, t, rtol), com)
    if rule == "spectral_flat":
        return isotropic_matrix(flatten_conv(com), t, rtol).reshape(com.shape)
    raise ValueError(f"not a spectral rule: {rule!r}")


def running_mean(cum: torch.Tensor, offset: torch.Tensor, t: int) -> torch.Tensor:
    """((t − 1) Δ_cum + (expert − θ0)) / t (module doc), a fresh tensor."""
    return torch.mul(cum, (t - 1) / t).add_(offset, alpha=1.0 / t)


@register_merger
@dataclasses.dataclass
class IsotropicMerger(Merger):
    """SAIM's adaptive isotropic merge (Eq. 10–12). ``lam`` = λ, ``alpha`` = α; ``preset``, ``qkv``,
    ``non_matrix`` and ``conv`` choose the rule table (module doc).

    ``alpha_grid`` (e.g. ``0.6,0.8,1.0,1.2``): when non-empty, α is the grid value whose deployed
    model scores best on the current task's validation data (the merge context's scorer). Biased: the
    choice is made on the current task only, so it favours α that keep that task (measured on mini:
    α = 1.0 at 6–7 of 9 steps, BWT −18.8); the paper's per-run search is a grid sweep over
    ``merger.alpha`` selected on every task's validation split."""

    name = "isotropic"
    description = ("adaptive isotropic merge (SAIM): SVD per matrix (q/k/v split), spectrum σ̄ + (Σ − σ̄)/√t, "
                   "running mean elsewhere, θ0 + αΔ")
    lam: float = 0.0
    alpha: float = 1.0
    alpha_grid: Tuple[float, ...] = ()
    preset: Literal["default", "fusionbench", "eq10"] = "default"
    qkv: Optional[Literal["split", "stacked"]] = None
    non_matrix: Optional[Literal["mean", "sum"]] = None
    conv: Optional[Literal["elementwise", "matrix"]] = None

    def __post_init__(self):
        self.rules = rule_table(self.preset, self.qkv, self.non_matrix, self.conv)

    def plan(self, step, context):
        return MergePlan(finalize=bool(self.alpha_grid))

    def merge_tensor(self, x):
        delta = self.merged_update(x)
        if self.alpha_grid:
            return delta  # θ0 + αΔ once α is chosen (finalize_tensor)
        return torch.add(x.base, delta, alpha=self.alpha)

    def merged_update(self, x) -> torch.Tensor:
        """Δ_merged of one tensor under its rule (module doc)."""
        return self.merged_tensor(x.name, x.base, x.previous, x.expert, x.start, x.step)

    def merged_tensor(self, name, base, previous, expert, start, step) -> torch.Tensor:
        """Δ_merged of one tensor under its rule (module doc), from plain tensors."""
        rule = rule_for(name, base, self.rules)
        if rule == "mean":
            return running_mean(torch.sub(previous, base), torch.sub(expert, base), step)
        return isotropic_tensor(rule, self.combined_update(base, previous, expert, start), step)

    def combined_update(self, base: torch.Tensor, previous: torch.Tensor, expert: torch.Tensor,
                        start: torch.Tensor) -> torch.Tensor:
        """Δ_com = (1 + λ) Δ_cum + (1 − λ) Δ_T (Eq. 10), a fresh tensor."""
        cum = torch.sub(previous, base)
        task = torch.sub(expert, start)
        if self.lam == 0.0:
            return cum.add_(task)
        return cum.mul_(1.0 + self.lam).add_(task, alpha=1.0 - self.lam)

    def after_pass(self, view):
        if not self.alpha_grid:
            return
        base, delta = view.inputs.base, view.intermediate
        best, best_score = None, -math.inf
        for a in self.alpha_grid:  # ties keep the earlier grid value
            candidate = LazyState(base, lambda n, a=a: torch.add(base[n], delta[n], alpha=a))
            score = view.context.score(candidate, "merger.alpha_grid")
            if score > best_score:
                best, best_score = a, score
        self._chosen = best
        view.context.record["chosen_alpha"] = best

    def finalize_tensor(self, x, delta):
        return torch.add(x.base, delta, alpha=self._chosen)


class LazyState(Mapping):
    """A candidate state computed one tensor at a time on lookup (so scoring it holds no model copy)."""

    def __init__(self, names, tensor: Callable[[str], torch.Tensor]):
        self._names, self._tensor = list(names), tensor

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)
