"""Continual-learning metrics on the accuracy matrix.

``matrix[t][i]`` (t = 0..T, i = 0..T-1): the model after step t (row 0 = θ0) on ``tasks[i]``, 0-based
like the stored arrays and the formulas in ``CONVENTIONS``.
Conventions (recorded in every result): BWT uses the GEM/SAIM denominator T−1; FWT compares the
model just before learning task i with θ0 on task i.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

Matrix = Sequence[Sequence[Optional[float]]]

#: every formula indexes the stored arrays as they are: 0-based, ``acc_matrix[t][i]`` = the model after step
#: t (row 0 = θ0, row t = after task t) on the task in column i (column i = the (i+1)-th task of the stream)
CONVENTIONS = {
    "indexing": "0-based, as stored: A = acc_matrix, A[t][i] = row t (0 = pre-trained, t = after step t), "
                "column i = tasks[i], i = 0..T-1; E = expert_acc",
    "acc": "mean_{i=0..T-1} A[T][i]",
    "bwt": "1/(T-1) * sum_{i=0..T-2} (A[T][i] - A[i+1][i])",
    "fwt": "1/(T-1) * sum_{i=1..T-1} (A[i][i] - A[0][i]); null if unseen tasks were not evaluated",
    "normalized_acc": "mean_{i=0..T-1} A[T][i] / E[i] (the run's own experts)",
    "normalized_acc_independent": "mean_{i=0..T-1} A[T][i] / independent_expert_acc[i] (experts fine-tuned "
                                  "from θ0 on task i alone; the tables' norm. ACC)",
    "acc_matrix": "row t = after step t (row 0 = pre-trained), column i = tasks[i], in [0, 1]",
}

#: the multitask protocol (every expert merged in one call, docs/protocol.md): the matrix has two rows
CONVENTIONS_MULTITASK = {
    "indexing": "0-based, as stored: A = acc_matrix, A[0] = pre-trained, A[1] = the merged model; "
                "column i = tasks[i], i = 0..T-1; E = expert_acc",
    "acc": "mean_{i=0..T-1} A[1][i] (row 1 = the merged model)",
    "bwt": "null: no model is deployed after each task, so there is no A[i+1][i] to forget from; "
           "the gap to each expert is normalized_acc",
    "fwt": "null: no model sits between tasks",
    "normalized_acc": "mean_{i=0..T-1} A[1][i] / E[i] (the independent experts)",
    "normalized_acc_independent": "the same as normalized_acc (the multitask protocol's experts are the "
                                  "independent experts)",
    "acc_matrix": "two rows: row 0 = pre-trained, row 1 = the merged model; column i = tasks[i], in [0, 1]",
    "sar": "one entry: the mean over all T tasks of SAR(expert_i - θ0, merged - θ0); per task in sar_per_task[0]",
}


def conventions(protocol: str) -> dict:
    """The metric conventions a result of ``protocol`` records."""
    return dict(CONVENTIONS_MULTITASK) if protocol == "multitask" else dict(CONVENTIONS)


def summary(matrix: Matrix, expert_acc: Sequence[float], protocol: str) -> dict:
    """acc, bwt, fwt, normalized_acc (mean and per task) of a run under ``protocol``."""
    if protocol == "multitask":
        if len(matrix) != 2 or len(matrix[1]) != len(expert_acc):
            raise ValueError("a multitask accuracy matrix has two rows (θ0, merged) of T columns")
        final = matrix[1]
        values = [v for v in final if v is not None]
        per_task = [v / e if (e and v is not None) else None for v, e in zip(final, expert_acc)]
        kept = [v for v in per_task if v is not None]
        return {"acc": sum(values) / len(values) if values else None, "bwt": None, "fwt": None,
                "normalized_acc": sum(kept) / len(kept) if kept else None, "normalized_acc_per_task": per_task}
    return {"acc": acc(matrix), "bwt": bwt(matrix), "fwt": fwt(matrix),
            "normalized_acc": mean_normalized_accuracy(matrix, expert_acc),
            "normalized_acc_per_task": normalized_accuracy(matrix, expert_acc)}


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
    cells = [(matrix[i][i], matrix[0][i]) for i in range(1, T)]  # the model just before task i, and θ0
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
