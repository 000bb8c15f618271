"""Numerical policy shared by the SVD-based merging rules (isotropic, OPCM, ...): one definition of the
precision thresholds, so the rules cannot drift apart.

* ``EPS32``: float32 machine epsilon.
* ``FAST_PATH_BOUND``: a Gram-matrix route may run in float32 when ε32·κ² (κ² = λ_max/λ_min of the Gram
  matrix, the relative error float32 can leave on the smallest singular value) is at most this;
  otherwise it runs in float64. ``float32_suffices(kappa2)`` applies it.
* ``null_tolerance(dtype)``: singular directions with σ_i ≤ this · σ_max carry no signal (their singular
  vectors are arbitrary); the rules drop them.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps
FAST_PATH_BOUND = 1e-5


def float32_suffices(kappa2: float) -> bool:
    """Whether a Gram matrix with λ_max/λ_min = ``kappa2`` (λ_min > 0) may be decomposed and applied in float32."""
    return EPS32 * kappa2 <= FAST_PATH_BOUND


def null_tolerance(dtype: torch.dtype) -> float:
    """Relative singular-value level below which a direction is treated as null."""
    return 10.0 * torch.finfo(dtype).eps
