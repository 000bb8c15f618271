"""Leaderboard rows from result dicts alone: one row per (benchmark, strategy, protocol, T,
hyperparameters); ACC, BWT, SAR at the final step and normalized ACC as mean ± sample standard
deviation (n − 1) over the group's runs (orders × seeds); per-order values (mean over seeds); the
worst order = lowest ACC."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .reference import match_reference


def describe_differences(mine: Dict[str, Any], peers: Sequence[Dict[str, Any]]) -> str:
    """``key=value`` for every setting in which ``mine`` differs from any of ``peers`` (sorted keys;
    "" when none): what tells same-named runs or rows apart in the tables."""
    differing = sorted({k for p in peers for k in set(p) | set(mine) if p.get(k) != mine.get(k)})
    return ", ".join(f"{k}={mine.get(k)}" for k in differing)

def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """Mean and sample standard deviation (n − 1) of the non-null values, and their count."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return None, None, 0
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else None), len(kept)


def final_sar(result: Dict[str, Any]) -> Optional[float]:
    sar = result.get("sar") or []
    return sar[-1] if sar else None


def variant_of(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in (result.get("hyperparameters") or {}).items() if k != "benchmark.num_tasks"}


def order_key(order: Any):
    return (0, order, "") if isinstance(order, int) else (1, 0, str(order))


@dataclasses.dataclass
class Row:
    benchmark: str
    model: Optional[str]
    strategy: str
    variant: str  # the hyperparameters that distinguish this row from same-named ones ("" if none)
    protocol: str
    T: int
    runs: List[Dict[str, Any]]
    stats: Dict[str, Tuple[Optional[float], Optional[float], int]]
    per_order: Dict[Any, Dict[str, Optional[float]]]
    worst_order: Any
    sar_scope: Optional[str]
    reference: Optional[Dict[str, Any]] = None
    diverged: int = 0  # runs of the row marked diverged: its metrics are shown as "diverged", never numbers

    @property
    def name(self) -> str:
        return f"{self.strategy} [{self.variant}]" if self.variant else self.strategy

    @property
    def n(self) -> int:
        return len(self.runs)


METRICS = {"acc": lambda r: r.get("acc"), "bwt": lambda r: r.get("bwt"), "sar": final_sar,
           "normalized_acc": lambda r: r.get("normalized_acc"),
           "zero_shot": lambda r: statistics.fmean(r["acc_matrix"][0]) if r.get("acc_matrix") and None not in r["acc_matrix"][0] else None,
           "expert": lambda r: statistics.fmean(r["expert_acc"]) if r.get("expert_acc") else None}


def aggregate(results: Sequence[Dict[str, Any]], reference: Optional[List[Dict[str, Any]]] = None) -> List[Row]:
    from ..normalization import independent_experts, independent_normalized_acc

    # normalized ACC over the independent experts for every strategy (cl_merge.normalization); the run's
    # own experts' version as normalized_acc_own
    experts = independent_experts(results)
    metrics = dict(METRICS, normalized_acc=lambda r: independent_normalized_acc(r, experts),
                   normalized_acc_own=lambda r: r.get("normalized_acc"))
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in results:
        key = (r["benchmark"], r.get("model"), r["strategy"], r["protocol"], len(r["tasks"]),
               json.dumps(variant_of(r), sort_keys=True, default=str))
        groups.setdefault(key, []).append(r)

    # name the hyperparameters that tell same-named groups apart
    by_name: Dict[Tuple, List[Dict[str, Any]]] = {}
    for key in groups:
        by_name.setdefault(key[:5], []).append(json.loads(key[5]))
    rows = []
    for key, runs in groups.items():
        benchmark, model, strategy, protocol, T, variant_json = key
        variants = by_name[key[:5]]
        variant = ""
        if len(variants) > 1:
            variant = describe_differences(json.loads(variant_json), variants)
        diverged = sum(1 for r in runs if r.get("diverged"))
        stats = {m: ((None, None, 0) if diverged else mean_std([f(r) for r in runs])) for m, f in metrics.items()}
        per_order: Dict[Any, Dict[str, Optional[float]]] = {}
        for order in sorted({r["order"] for r in runs}, key=order_key):
            of_order = [r for r in runs if r["order"] == order]
            bad = any(r.get("diverged") for r in of_order)
            per_order[order] = {m: None if bad else mean_std([metrics[m](r) for r in of_order])[0]
                                for m in ("acc", "bwt", "sar", "normalized_acc")}
            per_order[order]["diverged"] = bad
        ranked = [o for o in per_order if per_order[o]["acc"] is not None]
        worst = min(ranked, key=lambda o: per_order[o]["acc"]) if ranked else None
        if len(ranked) > 1 and max(per_order[o]["acc"] for o in ranked) - per_order[worst]["acc"] < 1e-12:
            worst = None  # every order gives the same ACC (e.g. order-invariant merging): no worst order
        scopes = {r.get("sar_scope") for r in runs if final_sar(r) is not None}
        row = Row(benchmark=benchmark, model=model, strategy=strategy, variant=variant, protocol=protocol, T=T,
                  runs=sorted(runs, key=lambda r: (order_key(r["order"]), r["seed"])), stats=stats,
                  per_order=per_order, worst_order=worst,
                  sar_scope=scopes.pop() if len(scopes) == 1 else ("mixed" if scopes else None), diverged=diverged)
        if reference is not None and not variant and all(r.get("registered_strategy", True) for r in runs):
            row.reference = match_reference(reference, model, strategy, T)
        rows.append(row)
    rows.sort(key=lambda r: (r.benchmark, str(r.model), r.T, r.stats["acc"][0] is None, -(r.stats["acc"][0] or 0.0),
                             r.name, r.protocol))
    return rows

