"""Whole-model reductions a merger declares for one merge step (see ``cl_merge.merge_engine``).

A per-tensor rule sometimes needs a number that depends on every merged tensor: TIES' global trim
threshold (the k-th smallest |τ| over all parameters), its all-parameter majority sign, OPCM's norms.
The merger declares such a number as a reduction; the engine computes it with passes over the
tensors of either parameter store, so no model-sized vector is ever concatenated:

* ``KthSmallestAbs``: exact k-th smallest |x| over every entry, in two histogram passes over the
  float32 bit patterns (O(65536) extra memory). Non-negative float32 values order like their int32
  bit patterns, so pass 1 histograms the high 16 bits and pass 2 the low 16 bits inside the bin that
  holds the k-th entry. Up to ``CONCAT_LIMIT`` entries in all (16 MiB of float32: the size of one
  large tensor), one pass concatenates |x| and takes ``kthvalue`` instead (faster; the same value).
* ``Total``: one pass summing a per-tensor contribution (a Python float or a tensor), in name order,
  starting from 0 (so the result is bit-identical to ``sum(...)`` over the same contributions).

A reduction runs before the per-tensor rule (``MergePlan.reductions``; later reductions see earlier
results in ``x.reduced``) or alongside it (``MergePlan.accumulators``: a ``Total`` whose contribution
also sees the rule's output).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

Specs = Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]

#: at most this many entries in all: KthSmallestAbs concatenates them (one pass) instead of two histogram passes
CONCAT_LIMIT = 1 << 22


class Reduction:
    """A value computed by ``passes`` passes over every merged tensor, in name order."""

    key: str = ""
    passes: int = 1

    def begin(self, specs: Specs) -> None:
        """Called once before the first pass with every merged tensor's (dtype, shape)."""

    def visit(self, pass_index: int, x) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """Called after each pass."""

    def result(self) -> Any:
        raise NotImplementedError


def _abs_bits(t: torch.Tensor) -> torch.Tensor:
    # non-negative float32 values order like their int32 bit patterns
    return t.detach().abs().float().reshape(-1).view(torch.int32).cpu()


def trim_kth(d: int, keep: float) -> Optional[int]:
    """The 1-based rank of TIES' trim threshold over ``d`` entries keeping the top ``keep`` fraction
    (``topk_values_mask``: the (d − ⌊keep·d⌋)-th smallest |x|); None when everything is kept."""
    kth = d - int(d * keep)
    return None if (kth <= 0 or d == 0) else kth


class KthSmallestAbs(Reduction):
    """Exact k-th smallest |v| over all entries of ``vector(x)`` for every tensor x (module doc).

    Give ``k`` (1-based) or ``keep`` (TIES' kept fraction: k = d − ⌊keep·d⌋ over the d entries of all
    tensors). The result is a float32 0-d tensor, or None when ``keep`` keeps every entry."""

    passes = 2

    def __init__(self, key: str, vector: Callable[[Any], torch.Tensor], keep: Optional[float] = None,
                 k: Optional[int] = None):
        if (keep is None) == (k is None):
            raise ValueError("give exactly one of keep and k")
        self.key, self.vector, self.keep, self.k = key, vector, keep, k

    def begin(self, specs: Specs) -> None:
        total = sum(math.prod(shape) for _, shape in specs.values())
        self._k = trim_kth(total, self.keep) if self.keep is not None else self.k
        self._concat = total <= CONCAT_LIMIT
        self.passes = 0 if self._k is None else (1 if self._concat else 2)
        self._parts = []
        self._total = 0
        self._hist = torch.zeros(1 << 15, dtype=torch.int64)  # sign bit is 0 for |x|: 15 high bits
        self._low = torch.zeros(1 << 16, dtype=torch.int64)

    def visit(self, pass_index: int, x) -> None:
        if self._concat:
            self._parts.append(self.vector(x).detach().abs().float().reshape(-1).cpu())
            return
        bits = _abs_bits(self.vector(x))
        if pass_index == 0:
            self._total += bits.numel()
            self._hist += torch.bincount((bits >> 16).long(), minlength=1 << 15)
        else:
            sel = bits[(bits >> 16) == self._high]
            if sel.numel():
                self._low += torch.bincount((sel & 0xFFFF).long(), minlength=1 << 16)

    def end_pass(self, pass_index: int) -> None:
        if self._concat:
            flat = torch.cat(self._parts)
            self._parts = []
            if not 1 <= self._k <= flat.numel():
                raise ValueError(f"k={self._k} outside 1..{flat.numel()}")
            self._value = flat.kthvalue(self._k).values
            return
        if pass_index == 0:
            if not 1 <= self._k <= self._total:
                raise ValueError(f"k={self._k} outside 1..{self._total}")
            cum = self._hist.cumsum(0)
            self._high = int(torch.searchsorted(cum, torch.tensor(self._k)))
            self._before = int(cum[self._high - 1]) if self._high > 0 else 0

    def result(self) -> Optional[torch.Tensor]:
        if self._k is None:
            return None
        if self._concat:
            return self._value
        low = int(torch.searchsorted(self._low.cumsum(0), torch.tensor(self._k - self._before)))
        return torch.tensor([(self._high << 16) | low], dtype=torch.int32).view(torch.float32)[0]


class Total(Reduction):
    """Σ over tensors of ``contribution(x)`` (or ``contribution(x, output)`` as an accumulator)."""

    def __init__(self, key: str, contribution: Callable[..., Any]):
        self.key, self.contribution = key, contribution

    def begin(self, specs: Specs) -> None:
        self._value: Any = 0

    def visit(self, pass_index: int, x, *output) -> None:
        self._value = self._value + self.contribution(x, *output)

    def result(self) -> Any:
        return self._value


def run_reduction(reduction: Reduction, specs: Specs, views: Callable[[], Iterable[Any]]) -> Any:
    """Run ``reduction`` to its result; ``views()`` yields one fresh per-tensor view per call."""
    reduction.begin(specs)
    for p in range(reduction.passes):
        for x in views():
            reduction.visit(p, x)
        reduction.end_pass(p)
    return reduction.result()


def kth_smallest_abs(tensors: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Exact k-th smallest |x| (1-based) over all entries of ``tensors`` (float32 0-d tensor)."""
    specs = {str(i): (t.dtype, tuple(t.shape)) for i, t in enumerate(tensors)}
    return run_reduction(KthSmallestAbs("kth", lambda t: t, k=k), specs, lambda: iter(tensors))
