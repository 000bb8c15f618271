"""Selection on validation data (``select = "val_acc"``): per (benchmark, model, strategy, protocol,
T), the swept setting whose runs have the best mean final-row validation accuracy. It reads only the
group key, ``hyperparameters`` and ``val_acc`` of each result, so the test split never enters the
choice."""

from __future__ import annotations

import json
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .aggregate import Row, variant_of

def validation_score(result: Dict[str, Any]) -> Optional[float]:
    """Mean over tasks of the final row on the validation splits; None when not recorded."""
    vals = result.get("val_acc")
    if not vals or any(v is None for v in vals):
        return None
    return statistics.fmean(vals)


def _selection_key(result: Dict[str, Any]) -> Tuple:
    return (result["benchmark"], result.get("model"), result["strategy"], result["protocol"], len(result["tasks"]))


def select_by_validation(results: Sequence[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Per (benchmark, model, strategy, protocol, T): the hyperparameter setting whose runs have the
    best mean validation score (module doc). Reads only the group key, ``hyperparameters`` and
    ``val_acc`` of each result. Returns the chosen runs and one record per choice."""
    groups: Dict[Tuple, Dict[str, List[Dict[str, Any]]]] = {}
    for r in results:
        variant = json.dumps(variant_of(r), sort_keys=True, default=str)
        groups.setdefault(_selection_key(r), {}).setdefault(variant, []).append(r)
    chosen, choices = [], []
    for key, variants in groups.items():
        scored = {}
        for variant, runs in sorted(variants.items()):
            scores = [validation_score(r) for r in runs]
            if any(v is None for v in scores):
                raise UserError(f"{key[2]}: a run has no val_acc (validation accuracy); rerun it with this "
                                "version, or drop select from the grid")
            scored[variant] = statistics.fmean(scores)
        best = max(scored, key=lambda v: scored[v])  # first maximum in sorted order
        picked = json.loads(best)
        others = [json.loads(v) for v in variants]
        swept = sorted({k for v in others for k in v if v.get(k) != picked.get(k)})
        chosen += variants[best]
        choices.append({"benchmark": key[0], "model": key[1], "strategy": key[2], "protocol": key[3], "T": key[4],
                        "selected": {k: picked.get(k) for k in swept}, "val_acc": scored[best],
                        "candidates": {json.dumps({k: json.loads(v).get(k) for k in swept}): s
                                       for v, s in scored.items()}})
    return chosen, choices


def mark_tuned(rows: Sequence[Row], choices: Sequence[Dict[str, Any]]) -> None:
    """Name each row's selected setting ("tuned on val: KEY=VALUE")."""
    by_key = {(c["benchmark"], c["model"], c["strategy"], c["protocol"], c["T"]): c for c in choices}
    for row in rows:
        c = by_key.get((row.benchmark, row.model, row.strategy, row.protocol, row.T))
        if c is not None and c["selected"]:
            row.variant = "tuned on val: " + ", ".join(f"{k}={v}" for k, v in c["selected"].items())


