"""Normalized accuracy with one stated denominator: the independent experts.

``normalized_acc_independent`` = mean over tasks of A[T][i] / (accuracy of the expert fine-tuned from
θ0 on task i alone), for every strategy; the tables' "norm. ACC" column shows it. The run's own
experts (for sequential strategies trained from the deployed model, so already carrying earlier tasks)
give ``normalized_acc``, kept as its own key.

Where the independent experts' accuracy comes from, in order:
1. the run itself: independent and multitask runs train exactly those experts (``expert_acc``);
2. a sequential run records ``independent_expert_acc`` when the expert cache already held them
   (read-only: it never trains extra experts);
3. tables and leaderboards fill the rest from an independent/multitask run in the same set with the
   same benchmark, model, seed, learner and learner/benchmark settings (its experts are the same).
Otherwise it is null ("–").
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

INDEPENDENT_EXPERTS = ("independent", "multitask")


def normalized(final_row: Sequence[Optional[float]], denominators: Sequence[Optional[float]]) -> Optional[float]:
    """mean_i final_row[i] / denominators[i] over the tasks where both are known (0-based columns)."""
    values = [a / e for a, e in zip(final_row, denominators) if a is not None and e]
    return sum(values) / len(values) if values else None


def final_row(result: Dict[str, Any]) -> Optional[List[Optional[float]]]:
    matrix = result.get("acc_matrix") or []
    return matrix[-1] if len(matrix) >= 2 else None


def _expert_key(result: Dict[str, Any]) -> str:
    """What an independent expert depends on (the task is matched by name)."""
    hp = {k: v for k, v in (result.get("hyperparameters") or {}).items()
          if k.startswith("learner.") or (k.startswith("benchmark.") and k != "benchmark.num_tasks")}
    return json.dumps([result.get("benchmark"), result.get("model"), result.get("seed"), result.get("learner"), hp],
                      sort_keys=True, default=str)


def independent_experts(results: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """expert key -> task name -> the independent expert's accuracy, from the independent/multitask runs."""
    table: Dict[str, Dict[str, float]] = {}
    for r in results:
        if r.get("protocol") in INDEPENDENT_EXPERTS and r.get("expert_acc"):
            by_task = table.setdefault(_expert_key(r), {})
            for name, acc in zip(r.get("tasks") or [], r["expert_acc"]):
                if acc is not None:
                    by_task.setdefault(name, acc)
    return table


def independent_normalized_acc(result: Dict[str, Any],
                               experts: Optional[Dict[str, Dict[str, float]]] = None) -> Optional[float]:
    """The result's normalized ACC over the independent experts (module doc), or None."""
    if result.get("diverged"):
        return None
    if result.get("normalized_acc_independent") is not None:
        return result["normalized_acc_independent"]
    row = final_row(result)
    if row is None:
        return None
    if result.get("protocol") in INDEPENDENT_EXPERTS:
        return normalized(row, result.get("expert_acc") or [])
    by_task = (experts or {}).get(_expert_key(result))
    if not by_task or any(name not in by_task for name in result.get("tasks") or []):
        return None
    return normalized(row, [by_task[name] for name in result["tasks"]])
