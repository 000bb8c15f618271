"""The shared spectral kernel against float64 LAPACK SVDs."""

import pytest
import torch

from cl_merge.spectral import gram_eigh, polar, truncated_svd


def _matrix(m, n, seed, decay=None):
    g = torch.Generator().manual_seed(seed)
    if decay is None:
        return torch.randn(m, n, generator=g)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -decay, r, dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (20, 20)])
@pytest.mark.parametrize("policy", ["auto", "float64"])
def test_truncated_svd_matches_lapack(shape, policy):
    a = _matrix(*shape, seed=1)
    k = 5
    u, s, v = truncated_svd(a, k, policy)
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    assert u.shape == (shape[0], k) and v.shape == (shape[1], k) and s.shape == (k,)
    assert torch.allclose(s.double(), s64[:k], rtol=1e-5)
    ref = (u64[:, :k] * s64[:k]) @ vh64[:k]
    assert torch.allclose(((u * s) @ v.T).double(), ref, atol=1e-5 * float(s64[0]))
    assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-5)
    assert torch.allclose(v.T @ v, torch.eye(k), atol=1e-5)


def test_ill_conditioned_matrix_takes_float64_route():
    a = _matrix(40, 20, seed=2, decay=4)  # κ = 1e4: a float32 Gram would lose the small directions
    g = gram_eigh(a, "auto")
    assert g.a.dtype == torch.float64
    q = polar(a)
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    assert torch.allclose(q.double(), u @ vh, atol=1e-4)
    # a well-conditioned rectangular matrix stays in float32
    assert gram_eigh(_matrix(60, 20, seed=3), "auto").a.dtype == torch.float32
    # rank-k truncation judges conditioning on the kept part only
    assert gram_eigh(a, "auto", rank=2).a.dtype == torch.float32


@pytest.mark.parametrize("shape", [(25, 10), (10, 25)])
def test_polar_factor_and_singular_values(shape):
    a = _matrix(*shape, seed=4)
    q, sigma = polar(a, return_singular=True)
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    assert torch.allclose(q.double(), u @ vh, atol=1e-5)
    assert torch.allclose(sigma, s, rtol=1e-5)


def test_polar_drops_null_directions():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(12, 3, generator=g) @ torch.randn(3, 8, generator=g)  # rank 3
    q = polar(a)
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    assert torch.allclose(q.double(), u[:, :3] @ vh[:3], atol=1e-5)
    u3, s3, v3 = truncated_svd(a, 6)
    assert s3.numel() == 3  # the null pairs are not returned
    assert not bool(polar(torch.zeros(4, 3)).any())


def test_rank_zero_truncation_is_empty():
    u, s, v = truncated_svd(torch.randn(5, 3), 0)
    assert u.shape == (5, 0) and s.shape == (0,) and v.shape == (3, 0)


# ---- the refined truncated route and its error study -------------------------------------------

def _finetune_like(m, n, noise, seed):
    """A decaying rank-8 signal plus noise (the benchmarks' fine-tuning-like task vectors)."""
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(m, 8, generator=g), torch.randn(8, n, generator=g)
    return (torch.randn(m, n, generator=g) * noise
            + (left * torch.logspace(0, -2, 8)) @ right / n ** 0.5)


def _rank_k_error(u, s, v, a, k):
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)  # the oracle
    ref = (u64[:, :k] * s64[:k]) @ vh64[:k]
    return float((((u.double() * s.double()) @ v.double().T) - ref).norm() / ref.norm())


@pytest.mark.parametrize("shape", [(192, 192), (384, 96), (96, 384)])
@pytest.mark.parametrize("noise", [0.05, 0.2])
@pytest.mark.parametrize("k", [4, 12])
def test_refined_route_error_is_bounded_by_its_prediction(shape, noise, k):
    """The error study in small: the refined route's measured error never exceeds its prediction,
    and truncated_svd("auto") stays within TRUNCATED_SVD_BOUND of a float64 SVD whatever route it takes."""
    import cl_merge.spectral as sp

    a = _finetune_like(*shape, noise, seed=shape[0] + 7 * k)
    tall = a.T if a.shape[0] < a.shape[1] else a
    lam, vec = torch.linalg.eigh(tall.T @ tall)
    lam, vec = sp._descending(lam.double(), vec)
    predicted = sp.refined_error_estimate(lam, k, sp.oversampled_size(k, tall.shape[1]))
    bound = sp.TRUNCATED_SVD_BOUND
    try:
        sp.TRUNCATED_SVD_BOUND = float("inf")  # measure the route even where it is not taken
        mu, v, b = sp._refined_top(tall, lam, vec, k)
    finally:
        sp.TRUNCATED_SVD_BOUND = bound
    measured = _rank_k_error(b / mu.sqrt(), mu.sqrt(), v, tall, k)
    assert measured <= predicted
    u, s, v = truncated_svd(a, k, "auto")
    assert _rank_k_error(u, s, v, a, k) <= bound
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-5)
    assert torch.allclose(v.T @ v, torch.eye(v.shape[1]), atol=1e-5)


def test_refined_route_is_taken_on_fine_tuning_like_spectra_and_rejected_on_tiny_gaps():
    import cl_merge.spectral as sp

    a = _finetune_like(192, 192, 0.05, seed=3)
    s = torch.linalg.svdvals(a.double())
    k = 12
    assert sp.EPS32 * float(s[0] / s[k - 1]) ** 2 > 1e-5  # the plain float32 test refuses it
    lam = torch.linalg.eigvalsh(a.T @ a).flip(0).double().clamp_min(0)
    assert sp.refined_error_estimate(lam, k, sp.oversampled_size(k, 192)) <= sp.TRUNCATED_SVD_BOUND
    # a cut inside a cluster (σ_k = σ_{k+q+1} up to 1e-9) has no stable rank-k truncation: rejected
    flat = torch.ones(40, dtype=torch.float64)
    flat[:3] = torch.tensor([100.0, 50.0, 20.0])
    assert sp.refined_error_estimate(flat, 5, 10) == float("inf")


def test_truncated_svd_ill_conditioned_matches_float64():
    """κ_k = 1e3 on the kept part: refined or float64 route, the factors match LAPACK's in float64."""
    a = _matrix(120, 60, seed=9, decay=6)  # σ from 1 to 1e-6
    k = 20
    u, s, v = truncated_svd(a, k, "auto")
    assert _rank_k_error(u, s, v, a, k) <= 1e-4
    s64 = torch.linalg.svdvals(a.double())[:k]
    assert torch.allclose(s.double(), s64, rtol=1e-4)
