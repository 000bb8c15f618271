"""Parameter / task-vector arithmetic on name -> tensor dicts.

Every merger and metric works on these plain dicts so that none of them depends on the model type.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch

StateDict = Dict[str, torch.Tensor]


def clone(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def _check_keys(a: StateDict, b: StateDict) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"parameter sets differ (e.g. {missing})")


def combine(fn: Callable[..., torch.Tensor], *states: StateDict) -> StateDict:
    """Apply ``fn`` tensor-wise over several dicts with the same keys."""
    first = states[0]
    for other in states[1:]:
        _check_keys(first, other)
    return {k: fn(*(s[k] for s in states)) for k in first}


def sub(a: StateDict, b: StateDict) -> StateDict:
    return combine(torch.sub, a, b)


def add(a: StateDict, b: StateDict) -> StateDict:
    return combine(torch.add, a, b)


def scale(a: StateDict, c: float) -> StateDict:
    return {k: v * c for k, v in a.items()}


def add_scaled(a: StateDict, b: StateDict, c: float) -> StateDict:
    """a + c * b"""
    return combine(lambda x, y: x + c * y, a, b)


def zeros_like(a: StateDict) -> StateDict:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def global_norm(a: StateDict) -> float:
    """Frobenius norm over all tensors together (float64 accumulation)."""
    total = sum(float(v.double().pow(2).sum()) for v in a.values())
    return total ** 0.5


def is_matrix(tensor: torch.Tensor) -> bool:
    """Shape test only (2-D). Which tensors a merger treats as matrices, and how q/k/v and conv1 are
    cut, is decided by ``cl_merge.tensor_kinds`` and each merger's rule table."""
    return tensor.ndim == 2


def nbytes(states: Iterable[StateDict]) -> int:
    return sum(v.numel() * v.element_size() for s in states for v in s.values())
