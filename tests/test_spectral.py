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
