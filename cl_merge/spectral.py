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

from typing import Literal, NamedTuple, Optional, Tuple

import torch

# the precision policy's constants live in one place (numerics): the float32 route is taken when
# ε32 · λ_max/λ_min of the Gram matrix (= ε32·κ²) is at most FAST_PATH_BOUND
from .numerics import EPS32, FAST_PATH_BOUND, float32_suffices, null_tolerance  # noqa: F401  (re-exported)

Policy = Literal["auto", "float64"]

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


def truncated_svd(mat: torch.Tensor, k: int, policy: Policy = "auto"
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets of ``mat`` (m × n): U (m × k'), σ (k'), V (n × k') with
    ``mat ≈ U diag(σ) Vᵀ``, k' ≤ k (null directions dropped). Returned in ``mat``'s dtype."""
    dtype = mat.dtype
    k = min(k, min(mat.shape))
    if k <= 0:
        return mat.new_zeros(mat.shape[0], 0), mat.new_zeros(0), mat.new_zeros(mat.shape[1], 0)
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
