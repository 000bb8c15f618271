"""Continual-learning metrics on the accuracy matrix.

A[t][i] (t = 0..T, i = 1..T) is stored 0-based by column: ``matrix[t][i-1]``; row 0 is θ0.
Conventions (recorded in every result): BWT uses the GEM/SAIM denominator T−1; FWT compares the
model just before learning task i with θ0 on task i.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

Matrix = Sequence[Sequence[Optional[float]]]

CONVENTIONS = {
    "acc": "mean_i A[T][i] over all T tasks",
    "bwt": "1/(T-1) * sum_{i<T} (A[T][i] - A[i][i])",
    "fwt": "1/(T-1) * sum_{i>1} (A[i-1][i] - A[0][i]); null if unseen tasks were not evaluated",
    "normalized_acc": "mean_i A[T][i] / expert_acc[i]",
    "acc_matrix": "row t = after step t (row 0 = pre-trained), column i-1 = task i, in [0, 1]",
}


def _T(matrix: Matrix) -> int:
    T = len(matrix) - 1
    if T < 1 or any(len(row) != T for row in matrix):
        raise ValueError("accuracy matrix must have T+1 rows of T columns")
    return T


def acc(matrix: Matrix) -> Optional[float]:
    """Null cells (a task that could not be evaluated, e.g. MergeBench's safety domain without its gated
    judge) are left out of the mean; None when the final row has no value at all."""
    T = _T(matrix)
    values = [v for v in matrix[T] if v is not None]
    return sum(values) / len(values) if values else None


def bwt(matrix: Matrix) -> Optional[float]:
    T = _T(matrix)
    if T < 2:
        return None
    pairs = [(matrix[T][i], matrix[i + 1][i]) for i in range(T - 1)]
    if any(a is None or b is None for a, b in pairs):  # a task that could not be evaluated
        return None
    return sum(a - b for a, b in pairs) / (T - 1)


def fwt(matrix: Matrix) -> Optional[float]:
    T = _T(matrix)
    if T < 2:
        return None
    cells = [(matrix[i][i], matrix[0][i]) for i in range(1, T)]  # A[i-1][i] in 1-based terms
    if any(a is None or b is None for a, b in cells):
        return None
    return sum(a - b for a, b in cells) / (T - 1)


def normalized_accuracy(matrix: Matrix, expert_acc: Sequence[float]) -> List[Optional[float]]:
    T = _T(matrix)
    return [matrix[T][i] / expert_acc[i] if (expert_acc[i] and matrix[T][i] is not None) else None
            for i in range(T)]


def mean_normalized_accuracy(matrix: Matrix, expert_acc: Sequence[float]) -> Optional[float]:
    values = [v for v in normalized_accuracy(matrix, expert_acc) if v is not None]
    return sum(values) / len(values) if values else None
