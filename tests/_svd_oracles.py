"""Float64 SVD references shared by the multi-task merger oracle tests (plain torch.linalg, not the
project's spectral kernel)."""

import torch


def svd64(a):
    """(U, S, V) of ``a`` in float64, thin, V with singular vectors as columns."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u, s, vh.T


def polar64(a):
    """The polar factor U Vᵀ of ``a`` in float64."""
    u, _, v = svd64(a)
    return u @ v.T
