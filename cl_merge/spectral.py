"""The shared spectral kernel: every per-layer SVD of the merging rules, through the Gram matrix.

A thin SVD of an m × n matrix A (m ≥ n; wide matrices are transposed and the factors swapped back)
comes from the eigendecomposition of the small Gram matrix G = AᵀA (n × n): G = V diag(σ²) Vᵀ and
U = A V diag(1/σ). That is one m·n² product and one n × n symmetric eigensolver, several times
cheaper on a CPU than LAPACK's SVD of A. The Gram matrix squares the condition number, so the working
precision is chosen per matrix — the policy of the adaptive isotropic merger (``strategies/
isotropic.py``) and of OPCM (``strategies/opcm.py``), factored out here:

* ``"auto"`` (the isotropic merger's rule): Gram, eigh and products in float32 when ε32·κ² ≤
  ``FAST_PATH_BOUND`` (1e-5: the relative error float32 can leave on the smallest singular value
  that matters), float64 throughout otherwise. κ is the condition number of the part of the
  spectrum the caller uses: the whole spectrum for ``polar`` (it divides by every σ), σ_1/σ_k for a
  rank-k ``truncated_svd`` (the discarded tail never enters a product). For the whole spectrum a
  Cholesky factorisation with a few inverse/power iterations spares the float32 eigh on matrices
  that are clearly too ill-conditioned; the eigenvalues are the decisive test either way.
* ``"float64"`` (OPCM's rule): Gram and eigh always in float64 — for callers that need every
  singular pair on its own (a float32 eigh rotates pairs with close singular values by
  ~ε32·λ_max/gap, not bounded by κ) — and the products in float32 when ε32·κ² ≤ FAST_PATH_BOUND.

* the refined truncated route (``"auto"``, ``truncated_svd`` only): when ε32·σ_1²/σ_k² fails, the
  float32 eigendecomposition is still used for its subspace: the q = 2k + 16 leading eigenvectors
  are orthonormalised in float64 and the k leading Ritz pairs of A on that subspace come from one
  m × q float64 product and a q × q float64 eigh (Rayleigh–Ritz). Only mixing between a kept pair and
  a pair outside the q-dimensional subspace survives; its first-order size, with the constants of an
  error study (``benchmarks/perf/truncated_svd_precision.py``: measured ≤ 0.8 × predicted wherever
  it matters), is ``refined_error_estimate``, and the route is taken when it is ≤
  ``TRUNCATED_SVD_BOUND`` (1e-4), else float64 throughout. On fine-tuning-like updates (a decaying
  rank-8 signal plus noise, σ_1/σ_32 ≈ 10–15) it errs by 4e-6–3e-5 against a float64 SVD, where a
  float32 LAPACK SVD errs by 3e-6–3e-5; cuts inside a dense cluster (tiny gaps) go to float64.

Null directions: singular values σ_i ≤ 10·ε(dtype)·σ_max carry no signal (their singular vectors are
arbitrary: any orthonormal completion is a valid SVD). They are dropped: ``truncated_svd`` returns
fewer than k pairs and ``polar`` is the orthonormal factor on the row/column space only (a literal
SVD would put a unit singular value on an arbitrary direction there). On full-rank matrices both are
exactly the SVD's.

eigh runs one matrix at a time (torch's batched CPU eigh oversubscribes threads on a loaded machine).

The isotropic merger (``isotropic_matrix``: its Gram/eigh block) and OPCM (``gram_eigh``) implement
this policy inline today; they can call ``gram_eigh(…, policy="auto" | "float64")`` here instead.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional, Tuple

import torch

# the precision policy's constants live in one place (numerics): the float32 route is taken when
# ε32 · λ_max/λ_min of the Gram matrix (= ε32·κ²) is at most FAST_PATH_BOUND
from .numerics import EPS32, FAST_PATH_BOUND, float32_suffices, null_tolerance  # noqa: F401  (re-exported)

Policy = Literal["auto", "float64"]

#: the refined truncated route (``truncated_svd``) is taken when its predicted relative error of the
#: rank-k reconstruction is at most this (the TSV-M/ISO-CTS target is 1e-4 on the merged update)
TRUNCATED_SVD_BOUND = 1e-4
#: the error study (benchmarks/perf/truncated_svd_precision.py) measures the refined route's error at
#: ≤ 0.8 × (0.15 · the first-order worst case |E_ij| = ε32·λ_1) wherever the mixing term matters
#: (predicted ≥ 1e-5), plus a float32 floor ≤ 2.6e-6 on flat spectra (σ_1/σ_k ≈ 1, where the mixing
#: term vanishes): the prediction is 0.15 · worst case + 20·ε32
TRUNCATED_OMEGA = 0.15
TRUNCATED_FLOOR = 20 * EPS32

class GramEigh(NamedTuple):
    """Eigendecomposition of the Gram matrix of a tall matrix.

    ``a``: the tall matrix (m ≥ n) in the working dtype; ``lam``: σ_i² in descending order (float64,
    ≥ 0); ``vec``: the matching eigenvectors (columns, working dtype); ``transposed``: whether ``a``
    is the caller's matrix transposed."""

    a: torch.Tensor
    lam: torch.Tensor
    vec: torch.Tensor
    transposed: bool


def float32_may_do(gram: torch.Tensor) -> bool:
    """Cheap pre-check (Cholesky + a few inverse/power iterations) that spares the float32
    eigendecomposition on clearly ill-conditioned Gram matrices. Its κ² estimate is a lower bound, so
    the decisive test is still the one on the eigenvalues."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return False
    n = gram.shape[-1]
    x = torch.linspace(1.0, 2.0, n, dtype=gram.dtype, device=gram.device).unsqueeze(-1)
    y = x.clone()
    for _ in range(6):
        x = torch.cholesky_solve(x, chol)
        x = x / x.norm()
        y = gram @ y
        y = y / y.norm()
    lam_min = float(x.T @ gram @ x)
    lam_max = float(y.T @ gram @ y)
    return lam_min > 0.0 and float32_suffices(lam_max / lam_min)


def _well_conditioned(lam: torch.Tensor, last: int) -> bool:
    """ε32 · λ_1/λ_last ≤ FAST_PATH_BOUND on descending eigenvalues (``last`` is 0-based)."""
    return bool(lam[last] > 0) and EPS32 * float(lam[0] / lam[last]) <= FAST_PATH_BOUND


def _descending(lam: torch.Tensor, vec: torch.Tensor):
    return lam.flip(0).clamp_min(0.0), vec.flip(1)


def gram_eigh(mat: torch.Tensor, policy: Policy = "auto", rank: Optional[int] = None) -> GramEigh:
    """Gram/eigh decomposition of ``mat`` with the module's precision ``policy``.

    ``rank``: how many leading singular values the caller will use (the conditioning test covers
    σ_1 … σ_rank); None = all of them."""
    transposed = mat.shape[0] < mat.shape[1]
    a = mat.T if transposed else mat
    n = a.shape[1]
    last = n - 1 if rank is None else max(0, min(rank, n) - 1)
    if a.dtype == torch.float64:
        lam, vec = _descending(*torch.linalg.eigh(a.T @ a))
        return GramEigh(a, lam, vec, transposed)
    a32 = a.float()
    if policy == "auto":
        gram = a32.T @ a32
        if rank is not None or float32_may_do(gram):
            lam, vec = torch.linalg.eigh(gram)
            lam, vec = _descending(lam.double(), vec)
            if _well_conditioned(lam, last):
                return GramEigh(a32, lam, vec, transposed)
        a64 = a.double()
        lam, vec = _descending(*torch.linalg.eigh(a64.T @ a64))
        return GramEigh(a64, lam, vec, transposed)
    if policy != "float64":
        raise ValueError(f"policy must be 'auto' or 'float64'; got {policy!r}")
    a64 = a.double()
    lam, vec = _descending(*torch.linalg.eigh(a64.T @ a64))
    if _well_conditioned(lam, last):
        return GramEigh(a32, lam, vec.float(), transposed)
    return GramEigh(a64, lam, vec, transposed)


def _kept(lam: torch.Tensor, count: int, dtype: torch.dtype) -> int:
    """How many of the ``count`` leading singular values are above the null tolerance."""
    if count == 0 or not bool(lam[0] > 0):
        return 0
    sigma = lam[:count].sqrt()
    return int((sigma > null_tolerance(dtype) * sigma[0]).sum())


def oversampled_size(k: int, n: int) -> int:
    """Dimension q of the float32 subspace the refined route resolves in float64: 2k + 16 (≤ n)."""
    return min(n, 2 * k + 16)


def refined_error_estimate(lam: torch.Tensor, k: int, q: int) -> float:
    """Predicted relative error ‖A_k − Ã_k‖_F / ‖A_k‖_F of the refined truncated route (module doc).

    ``lam``: the float32 Gram matrix's eigenvalues (descending, float64). First-order perturbation:
    the float32 Gram matrix and its eigensolver leave a symmetric error E with |E_ij| ≲ ε32·λ_1;
    Rayleigh–Ritz in float64 on the q leading eigenvectors resolves every rotation inside that
    subspace, so only the mixing of a kept pair i ≤ k with a pair j > q remains, by an angle
    E_ij/(λ_i − λ_j), which moves A_k by √(λ_i + λ_j) times that angle. ``TRUNCATED_OMEGA`` scales the
    worst-case |E_ij| to what the error study measures and ``TRUNCATED_FLOOR`` is its float32 floor
    (``benchmarks/perf/truncated_svd_precision.py``, ``tests/test_spectral.py``)."""
    n = lam.numel()
    if q >= n:
        return TRUNCATED_FLOOR  # the whole space is resolved in float64
    top, rest = lam[:k, None], lam[None, q:]
    gap = top - rest
    if not bool((gap > 0).all()):
        return math.inf
    cross = float(((top + rest) / gap.square()).sum())
    norm2 = float(lam[:k].sum())
    if norm2 <= 0.0:
        return math.inf
    return TRUNCATED_OMEGA * EPS32 * float(lam[0]) * math.sqrt(cross / norm2) + TRUNCATED_FLOOR


def _refined_top(a32: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor, k: int):
    """Rayleigh–Ritz in float64 on the q = 2k + 16 leading float32 eigenvectors of the float32 Gram
    matrix of ``a32`` (tall). Returns (σ² descending, V, U) of the k leading Ritz pairs in float64, or
    None when the predicted error exceeds ``TRUNCATED_SVD_BOUND``."""
    q = oversampled_size(k, a32.shape[1])
    if refined_error_estimate(lam, k, q) > TRUNCATED_SVD_BOUND:
        return None
    w = torch.linalg.qr(vec[:, :q].double()).Q      # orthonormal to ε64
    b = a32.double() @ w                             # m × q, the only large float64 product
    mu, z = _descending(*torch.linalg.eigh(b.T @ b))
    z = z[:, :k]
    return mu[:k], w @ z, b @ z


def truncated_svd(mat: torch.Tensor, k: int, policy: Policy = "auto"
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets of ``mat`` (m × n): U (m × k'), σ (k'), V (n × k') with
    ``mat ≈ U diag(σ) Vᵀ``, k' ≤ k (null directions dropped). Returned in ``mat``'s dtype.

    Under ``"auto"`` a float32 matrix whose σ_1/σ_k is too large for the plain float32 route first
    tries the refined route (module doc): float64 Rayleigh–Ritz on the oversampled float32
    eigenbasis, taken when its predicted error is at most ``TRUNCATED_SVD_BOUND``."""
    dtype = mat.dtype
    k = min(k, min(mat.shape))
    if k <= 0:
        return mat.new_zeros(mat.shape[0], 0), mat.new_zeros(0), mat.new_zeros(mat.shape[1], 0)
    if policy == "auto" and dtype != torch.float64:
        transposed = mat.shape[0] < mat.shape[1]
        a32 = (mat.T if transposed else mat).float()
        lam, vec = torch.linalg.eigh(a32.T @ a32)
        lam, vec = _descending(lam.double(), vec)
        if _well_conditioned(lam, k - 1):
            g = GramEigh(a32, lam, vec, transposed)
        else:
            refined = _refined_top(a32, lam, vec, k)
            if refined is None:
                g = gram_eigh(mat, "float64")  # the float64 route (ε32·κ² test fails, refinement too)
            else:
                mu, v64, b = refined
                keep = _kept(mu, k, dtype)
                sigma = mu[:keep].sqrt()
                left = b[:, :keep] / sigma
                v64 = v64[:, :keep]
                u, v = (v64, left) if transposed else (left, v64)
                return u.to(dtype), sigma.to(dtype), v.to(dtype)
    else:
        g = gram_eigh(mat, policy, rank=k)
    keep = _kept(g.lam, k, dtype)
    lam, vec = g.lam[:keep], g.vec[:, :keep]
    sigma = lam.sqrt()
    left = (g.a @ vec) / sigma.to(vec.dtype)  # U = A V diag(1/σ)
    u, v = (vec, left) if g.transposed else (left, vec)
    return u.to(dtype), sigma.to(dtype), v.to(dtype)


def polar(mat: torch.Tensor, policy: Policy = "auto", return_singular: bool = False):
    """The orthonormal polar factor U Vᵀ of ``mat`` (its thin SVD U Σ Vᵀ), null directions
    dropped. With ``return_singular``, also all min(m, n) singular values (float64, descending; the
    null ones as computed, ≈ 0)."""
    dtype = mat.dtype
    g = gram_eigh(mat, policy)
    n = g.lam.numel()
    keep = _kept(g.lam, n, dtype)
    vec = g.vec[:, :keep]
    inv_sigma = (1.0 / g.lam[:keep].sqrt()).to(vec.dtype)
    q = g.a @ ((vec * inv_sigma) @ vec.T)  # A V diag(1/σ) Vᵀ = U Vᵀ
    q = (q.T if g.transposed else q).to(dtype)
    if return_singular:
        return q, g.lam.sqrt()
    return q
