"""Adaptive isotropic merging (SAIM paper, Eq. 10–12 and Algorithm 2).

Per step t, with θ0 = ``base``, Δ_cum = previous − θ0 and Δ_T = expert − start:

    Δ_com    = (1 + λ) Δ_cum + (1 − λ) Δ_T                              (Eq. 10)
    2-D:      U Σ Vᵀ = SVD(Δ_com),  σ̄ = mean(Σ),  Σ̂ = σ̄ + (Σ − σ̄)/√t     (Eq. 11)
              Δ_merged = U Σ̂ Vᵀ
    non-2-D:  Δ_merged = Δ_com   (biases, norms, class embedding; conv1 (4-D) too, see
              ``cl_merge.params.is_matrix``)
    deployed = θ0 + α Δ_merged                                           (Eq. 12)

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
from typing import Callable, Optional, Tuple

import torch

from cl_merge.merge_engine import MergePlan
from cl_merge.merger import Merger
from cl_merge.numerics import FAST_PATH_BOUND, float32_suffices, null_tolerance  # noqa: F401  (re-exported)
from cl_merge.params import is_matrix
from cl_merge.registry import register_merger


def spectrum_factors(sigma: torch.Tensor, t: int, rank: int, rtol: float) -> torch.Tensor:
    """σ̂/σ for Eq. 11 given the min(m, n) singular values ``sigma`` (σ̄ averages all of them);
    0 on null directions."""
    c = 1.0 / math.sqrt(t)
    mean = sigma.sum() / rank
    keep = sigma > rtol * sigma.max()
    return torch.where(keep, c + (1.0 - c) * mean / torch.where(keep, sigma, 1.0), 0.0)


def _float32_may_do(gram: torch.Tensor) -> bool:
    """Cheap pre-check (Cholesky + a few inverse/power iterations, O(n²) after the factorisation)
    that spares the float32 eigendecomposition on Gram matrices that are clearly too ill-conditioned.
    Its κ² estimate is a lower bound, so the decisive test is still the one on the eigenvalues."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return False
    n = gram.shape[-1]
    x = torch.linspace(1.0, 2.0, n, dtype=gram.dtype, device=gram.device).unsqueeze(-1)  # any fixed, generic start
    y = x.clone()
    for _ in range(6):
        x = torch.cholesky_solve(x, chol)
        x = x / x.norm()
        y = gram @ y
        y = y / y.norm()
    lam_min = float(x.T @ gram @ x)
    lam_max = float(y.T @ gram @ y)
    return lam_min > 0.0 and float32_suffices(lam_max / lam_min)


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
        if _float32_may_do(gram):
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


@register_merger
@dataclasses.dataclass
class IsotropicMerger(Merger):
    """SAIM's adaptive isotropic merge (Eq. 10–12). ``lam`` = λ, ``alpha`` = α.

    ``alpha_grid`` (e.g. ``0.6,0.8,1.0,1.2``): when non-empty, α is the grid value whose deployed
    model scores best on the current task's validation data (the merge context's scorer)."""

    name = "isotropic"
    description = "adaptive isotropic merge (SAIM): SVD per matrix, spectrum σ̄ + (Σ − σ̄)/√t, θ0 + αΔ"
    lam: float = 0.0
    alpha: float = 1.0
    alpha_grid: Tuple[float, ...] = ()

    def plan(self, step, context):
        return MergePlan(finalize=bool(self.alpha_grid))

    def merge_tensor(self, x):
        delta = self.merged_update(x)
        if self.alpha_grid:
            return delta  # θ0 + αΔ once α is chosen (finalize_tensor)
        return torch.add(x.base, delta, alpha=self.alpha)

    def merged_update(self, x) -> torch.Tensor:
        """Δ_merged of one tensor: Eq. 11 on a 2-D Δ_com, Δ_com itself otherwise."""
        delta = self.combined_update(x.base, x.previous, x.expert, x.start)
        return isotropic_matrix(delta, x.step) if is_matrix(delta) else delta

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
