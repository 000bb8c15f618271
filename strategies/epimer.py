"""EpiMer: curvature-aware Fréchet mean of the task vectors in a per-task tagged subspace
("Model Merging on Loss Landscapes: A Geometry Perspective", Eq. 13/14; supplement B.2–B.4, Case 5;
``docs/multitask-merging.md``), all experts at once.

Per matrix (δ_t = expert_t − θ0 of one m × n weight, T experts, λ_t = 1/T):

1. Tagged basis (TSV-M's, ``strategies/tsv_merge.py``): the rank-k SVD of every δ_t, concatenated
   and Procrustes-whitened, gives U_⊥ (m × p), V_⊥ (n × p), p = T·k; the atoms are the rank-1
   matrices u_i v_iᵀ, orthonormal in the Frobenius inner product, so S = [vec(u_i v_iᵀ)]_i has
   SᵀS = I_p. Each atom is owned by the task it came from.
2. Coordinates δ̃_t ∈ ℝ^p (``coefficients="tagged"``, default): task t's own singular values on its
   own atoms, 0 on the others — the TSV-M reading of "each rank-1 atom is owned by exactly one task",
   under which the homogeneous limit below is TSV-M. ``"projected"``: δ̃_t = Sᵀ vec(δ_t) =
   diag(U_⊥ᵀ δ_t V_⊥) (the supplement's notation table).
3. Curvature: H_t ≈ diag(v_t) + εI (empirical Fisher diagonal v_t of the expert, Eq. 27, jitter ε
   before projecting as the supplement's remark says), projected: H̃_t = Sᵀ H_t S (p × p, dense).
4. Fréchet mean (Eq. 13):  δ̃* = H̄⁻¹ Σ_t λ_t H̃_t δ̃_t,  H̄ = Σ_t λ_t H̃_t.
   ``aggregator="frechet_sum"`` (Eq. 14, the default, the supplement's headline "frechet_sum"): the
   matrix-weighted sum α·T·δ̃*; ``"frechet_mean"``: α·δ̃*.
5. Δ = U_⊥ diag(δ̃) V_⊥ᵀ (= S δ̃ reshaped).

Limits (tested): identical curvature for all tasks (H̃_t ≡ H̄) gives α Σ_t δ̃_t = α · TSV-M; with
S = I and diagonal curvature Eq. 13 is Fisher-weighted averaging (``subspace_frechet`` on an
explicit basis).

How it is computed without forming H̃_t for every task. H̄ is linear in the curvature:
H̄ = Sᵀ diag(v̄ + ε) S with v̄ = Σ_t λ_t v_t, so one weighted Gram matrix per layer is enough
(Σ_ab w_ab (u_a ∘ v_b)(u_a ∘ v_b)ᵀ over the rows u_a of U_⊥ and v_b of V_⊥, in row chunks: m·n·p²
flops, the dominant cost). And H̃_t δ̃_t = Sᵀ vec((v_t + ε) ⊙ U_⊥ diag(δ̃_t) V_⊥ᵀ) is a
matrix–vector product (m·n·p flops per task). A literal implementation forms the T matrices H̃_t:
T times the dominant cost (``benchmarks/perf/multitask_merge.py`` compares the two).

Precision: the per-task SVDs use the spectral kernel's ``"float64"`` policy (``cl_merge.spectral``:
each singular pair is an atom of its own, so pairs with close singular values must not rotate into
each other); the Gram matrix H̄ and the right-hand side are formed in float32 when ε32·κ(H̄) ≤
``FAST_PATH_BOUND`` (checked on H̄'s float64 eigenvalues) and again in float64 otherwise; the p × p
solve is float64 (Cholesky).

Choices where the paper is silent (also listed in ``docs/multitask-merging.md``):

* ε: ``eps`` = 1e-6 relative to the layer's mean of v̄ (``eps_scale="relative"``: jitter
  ε·mean(v̄) for every task of that layer, so the method is invariant to the loss scale), or an
  absolute ε (``eps_scale="absolute"``). A layer whose Fisher is all zero gets the absolute ``eps``.
* No per-task normalisation of the Fisher (the formula uses v_t as estimated; FusionBench's Fisher
  averaging normalises each model's Fisher by its global norm, EpiMer's equations do not).
* k is capped at ⌊r/T⌋ (r = min(m, n)) so the p = T·k whitened atoms fit; a matrix with r < T gets
  the non-matrix rule.
* Non-matrix tensors (biases, norms, class/positional embeddings when not treated as matrices,
  conv kernels): ``nonmatrix="mean"`` (default) α·mean_t δ_t, TSV-M's rule (FusionBench), which keeps
  the homogeneous limit equal to TSV-M on the whole model; ``"fisher"``: α times the Fisher-weighted
  average (S = I, diagonal curvature: Case 2 of the supplement; the Fréchet *mean*, since T times a
  per-coordinate mean is no merge).
* α scales the whole merged delta (the supplement's "global Frobenius rescaling"), as TSV-M's α.

Diagnostic: ``diagnostics[name]`` = η = cᵀ H̄⁻¹ c (Theorem 3: the curvature advantage over the flat
mean in the subspace, 0 iff curvature and task-vector deviations are uncorrelated), per matrix, from
c = b − H̄ δ̄ (B.4.3) at no extra cost.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Literal, Optional, Sequence

import torch

from cl_merge.registry import register_merger
from cl_merge.components import PositiveInt, UnitInterval
from cl_merge.multitask_merge import MultiTaskMerger, mean, per_task_rank
from cl_merge.spectral import EPS32, FAST_PATH_BOUND
from cl_merge.strategies.fisher_merge import fisher_average
from cl_merge.strategies.tsv_merge import TaskFactors, task_factors, whiten

#: elements of one Khatri–Rao row block (rows × n × p) in ``projected_curvature`` (32 MB in float32)
CHUNK_ELEMENTS = 1 << 23


def check_settings(k: int, eps: float) -> None:
    """The settings every EpiMer variant (all at once, continual) refuses."""
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0 (it keeps every projected curvature positive definite); got {eps}")


def projected_curvature(u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sᵀ diag(vec(weight)) S for S = [vec(u_i v_iᵀ)]_i: Σ_ab weight_ab (u_a ∘ v_b)(u_a ∘ v_b)ᵀ."""
    m, p = u.shape
    n = v.shape[0]
    rows = max(1, CHUNK_ELEMENTS // max(1, n * p))
    h = u.new_zeros(p, p)
    for a in range(0, m, rows):
        y = (u[a:a + rows, None, :] * v[None, :, :]).reshape(-1, p)
        h.addmm_(y.T, y * weight[a:a + rows].reshape(-1, 1))
    return (h + h.T) * 0.5


def project(u: torch.Tensor, v: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Sᵀ vec(mat) = diag(Uᵀ mat V)."""
    return ((mat @ v) * u).sum(0)


def lift(u: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """S coeff as a matrix: U diag(coeff) Vᵀ."""
    return (u * coeff) @ v.T


def solve_spd(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """H⁻¹ b in float64 (Cholesky; least squares if H is not numerically positive definite)."""
    h64, b64 = h.double(), b.double()
    chol, info = torch.linalg.cholesky_ex(h64)
    if int(info) == 0:
        return torch.cholesky_solve(b64[:, None], chol)[:, 0]
    return torch.linalg.lstsq(h64, b64[:, None]).solution[:, 0]


def subspace_frechet(basis: torch.Tensor, curvatures: Sequence[torch.Tensor], coords: Sequence[torch.Tensor],
                     weights: Sequence[float]) -> torch.Tensor:
    """Eq. 13 on an explicit orthonormal basis S (d × p), full curvatures H_t (d × d) and subspace
    coordinates δ̃_t (p): returns S δ̃* with δ̃* = (Σ λ_t SᵀH_tS)⁻¹ Σ λ_t SᵀH_tS δ̃_t. Reference form
    for small problems (the limit cases); EpiMer itself never forms S."""
    proj = [basis.T @ h @ basis for h in curvatures]
    h_bar = sum(w * h for w, h in zip(weights, proj))
    b = sum(w * (h @ c) for w, h, c in zip(weights, proj, coords))
    return basis.to(torch.float64) @ solve_spd(h_bar, b)


def _curvature_system(u, v, factors, deltas, fishers, jitter, coefficients):
    """(H̄, b, δ̄) in the dtype of ``u``."""
    tasks = len(fishers)
    lam = 1.0 / tasks
    f_bar = torch.stack([f.to(u.dtype) for f in fishers]).mean(0)
    h_bar = projected_curvature(u, v, f_bar + jitter)
    b = u.new_zeros(u.shape[1])
    d_bar = u.new_zeros(u.shape[1])
    sigma = factors.sigma.to(u.dtype)
    for t in range(tasks):
        if coefficients == "tagged":
            own = factors.owner == t
            coord = torch.where(own, sigma, 0.0)
            mat = (u[:, own] * sigma[own]) @ v[:, own].T
        else:
            coord = project(u, v, deltas[t].to(u.dtype))
            mat = lift(u, v, coord)
        b += lam * project(u, v, (fishers[t].to(u.dtype) + jitter) * mat)
        d_bar += lam * coord
    return h_bar, b, d_bar


def epimer_matrix(deltas: List[torch.Tensor], fishers: List[torch.Tensor], k: int, *, alpha: float = 1.0,
                  eps: float = 1e-6, eps_scale: str = "relative", aggregator: str = "frechet_sum",
                  coefficients: str = "tagged", diagnostics: Dict[str, float] = None, name: str = ""
                  ) -> torch.Tensor:
    """EpiMer's Δ for one matrix (module docstring, steps 1–5), k ≥ 1 per task."""
    factors = task_factors(deltas, k, policy="float64")
    return epimer_from_factors(factors, fishers, deltas if coefficients == "projected" else None, alpha=alpha,
                               eps=eps, eps_scale=eps_scale, aggregator=aggregator, diagnostics=diagnostics,
                               name=name)


def epimer_from_factors(factors: TaskFactors, fishers: List[torch.Tensor], deltas: Optional[List[torch.Tensor]] = None,
                        *, alpha: float = 1.0, eps: float = 1e-6, eps_scale: str = "relative",
                        aggregator: str = "frechet_sum", diagnostics: Dict[str, float] = None, name: str = ""
                        ) -> torch.Tensor:
    """Steps 1–5 from the T tasks' (unwhitened) rank-k factors and Fisher diagonals: ``tagged``
    coefficients, or ``projected`` ones when ``deltas`` (the full task vectors) are given. The
    continual variant (``strategies/continual_multitask.py``) keeps exactly these inputs."""
    dtype = factors.u.dtype
    coefficients = "tagged" if deltas is None else "projected"
    factors = whiten(factors)
    f_mean = float(torch.stack(fishers).double().mean())
    jitter = eps * f_mean if eps_scale == "relative" and f_mean > 0 else eps
    u, v = factors.u, factors.v
    h_bar, b, d_bar = _curvature_system(u, v, factors, deltas, fishers, jitter, coefficients)
    if u.dtype != torch.float64:
        ev = torch.linalg.eigvalsh(h_bar.double())
        if not (ev[0] > 0 and EPS32 * float(ev[-1] / ev[0]) <= FAST_PATH_BOUND):
            u64, v64 = u.double(), v.double()
            h_bar, b, d_bar = _curvature_system(u64, v64, factors, deltas, fishers, jitter, coefficients)
    x = solve_spd(h_bar, b)
    if diagnostics is not None:
        c = b.double() - h_bar.double() @ d_bar.double()
        diagnostics[name] = float(c @ (x - d_bar.double()))  # cᵀH̄⁻¹c, since H̄⁻¹c = δ̃* − δ̄
    scale = alpha * (len(fishers) if aggregator == "frechet_sum" else 1.0)
    return lift(u.double(), v.double(), scale * x).to(dtype)


@register_merger
@dataclasses.dataclass
class EpiMerMerger(MultiTaskMerger):
    """EpiMer: curvature-aware Fréchet merge in TSV-M's tagged subspace (Eq. 14 by default)."""

    name = "epimer"
    description = ("EpiMer: Fisher curvature projected on the per-task whitened rank-k atoms, "
                   "matrix-weighted sum α·T·H̄⁻¹Σλ_tH̃_tδ̃_t (k 32, α 1)")
    needs_fisher = True
    k: int = 32
    alpha: float = 1.0
    eps: float = 1e-6
    eps_scale: Literal["relative", "absolute"] = "relative"
    aggregator: Literal["frechet_sum", "frechet_mean"] = "frechet_sum"
    coefficients: Literal["tagged", "projected"] = "tagged"
    nonmatrix: Literal["mean", "fisher"] = "mean"
    # how each expert's Fisher diagonal is estimated (cl_merge.fisher; the protocol computes and caches it)
    fisher_fraction: UnitInterval = 0.005  # of the task's training split
    fisher_min_samples: PositiveInt = 256

    def __post_init__(self):
        check_settings(self.k, self.eps)
        self.diagnostics: Dict[str, float] = {}

    def prepare(self, base, experts, fishers):
        self.diagnostics = {}  # η of this merge only

    def merge_matrix(self, deltas, fishers=None, *, name=""):
        k = per_task_rank(deltas[0].shape, len(deltas), self.k, None)
        if k == 0:
            return self.merge_other(deltas, fishers, name=name)
        return epimer_matrix(deltas, fishers, k, alpha=self.alpha, eps=self.eps, eps_scale=self.eps_scale,
                             aggregator=self.aggregator, coefficients=self.coefficients,
                             diagnostics=self.diagnostics, name=name)

    def merge_other(self, deltas, fishers=None, *, name=""):
        if self.nonmatrix == "mean":
            return self.alpha * mean(deltas)
        f_mean = float(torch.stack(fishers).double().mean())
        jitter = self.eps * f_mean if self.eps_scale == "relative" and f_mean > 0 else self.eps
        return self.alpha * fisher_average(deltas, fishers, [1.0 / len(deltas)] * len(deltas), jitter)
