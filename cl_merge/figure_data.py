"""The numbers behind the expert figures (definitions in ``cl_merge.plots``' doc and docs/):
histograms of log10 |expert − θ0| (Fig. 2) and the weight-disentanglement error ξ(α1, α2) on a grid
(Fig. 3 and 5, Eq. 13 and 35). Plain data (lists, floats): the figures and the JSON beside them are
drawn from it."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import UserError
from .figure_experts import ExpertSource

GRID_LO, GRID_HI, GRID_N = -0.5, 1.5, 21
AUTO_ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))
HIST_LO, HIST_HI, HIST_PER_DECADE = -12.0, 1.0, 10  # log10 |Δθ| bins; values outside are clipped


def delta_hist_data(source: ExpertSource, learners: Sequence[str], indices: Sequence[int]) -> Dict[str, Any]:
    """Per learner and task: counts of log10 |expert − θ0| on fixed bins (no per-parameter arrays are
    kept, so a full-size backbone fits), the median and the share of exactly unchanged parameters."""
    bins = int((HIST_HI - HIST_LO) * HIST_PER_DECADE)
    data: Dict[str, Any] = {"benchmark": source.benchmark_name, "order": source.order, "learners": {},
                            "edges": np.linspace(HIST_LO, HIST_HI, bins + 1).tolist()}
    for name in learners:
        experts = source.experts(name, indices)
        per_task = {}
        for i in indices:
            delta = torch.cat([(experts[i][k].float() - source.theta0[k].float()).abs().flatten().cpu()
                               for k in source.theta0])
            logs = torch.log10(delta[delta > 0]).clamp_(HIST_LO, HIST_HI)
            per_task[source.stream.names[i]] = {
                "counts": torch.histc(logs, bins=bins, min=HIST_LO, max=HIST_HI).tolist(),
                "median": float(logs.median()) if logs.numel() else None,
                "unchanged": 1.0 - logs.numel() / max(delta.numel(), 1),
                "count": delta.numel(),
            }
            del delta, logs
        data["learners"][name] = per_task
    return data


def _predict(adapter, state, dataset, task) -> torch.Tensor:
    adapter.set_state(state)
    return adapter.predict(dataset, task)


def _combine(theta0, terms: Sequence[Tuple[float, Dict[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in theta0.items()}
    for coef, tau in terms:
        if coef:
            for k in out:
                out[k].add_(tau[k], alpha=coef)
    return out


def _subset(dataset, n: int):
    from torch.utils.data import Subset

    return Subset(dataset, range(min(n, len(dataset))))


def choose_others_alpha(source: ExpertSource, taus: Dict[int, Dict[str, torch.Tensor]], eval_n: int,
                        reporter) -> Tuple[float, Dict[float, float]]:
    """The α in 0.1..1.0 whose θ0 + α Σ τ has the best mean validation accuracy over the stream."""
    scores = {}
    tasks = source.stream.tasks
    total = _combine(source.theta0, [(1.0, tau) for tau in taus.values()])
    summed = {k: total[k] - source.theta0[k] for k in total}
    with reporter.task("choose α for the other tasks (validation)", total=len(AUTO_ALPHAS)) as bar:
        for alpha in AUTO_ALPHAS:
            source.adapter.set_state(_combine(source.theta0, [(alpha, summed)]))
            accs = []
            for task in tasks:
                data = _subset(task.val, eval_n)
                pred = source.adapter.predict(data, task)
                labels = torch.tensor([int(data[i][1]) for i in range(len(data))])
                accs.append(float((pred == labels).float().mean()))
            scores[alpha] = float(np.mean(accs))
            bar.advance()
    best = max(scores, key=lambda a: (scores[a], -a))
    return best, scores


def disentanglement_data(source: ExpertSource, learner: str, pair: Tuple[int, int], others: str,
                         others_alpha: Optional[float], grid: int = GRID_N, eval_n: int = 128) -> Dict[str, Any]:
    from .progress import Reporter

    if not hasattr(source.adapter, "predict"):
        raise UserError("the disentanglement plot needs a classifier model adapter (one with predict())")
    a, b = pair
    indices = list(range(len(source.stream))) if others == "fixed" else [a, b]
    experts = source.experts(learner, indices)
    taus = {i: {k: experts[i][k] - source.theta0[k] for k in source.theta0} for i in indices}
    alphas = np.linspace(GRID_LO, GRID_HI, grid)
    tasks = source.stream.tasks
    data = {t: _subset(tasks[t].test, eval_n) for t in (a, b)}
    with Reporter(enabled=source.progress) as reporter:
        fixed_terms: List[Tuple[float, Dict[str, torch.Tensor]]] = []
        scores = None
        if others == "fixed":
            if others_alpha is None:
                others_alpha, scores = choose_others_alpha(source, taus, eval_n, reporter)
            fixed_terms = [(others_alpha, taus[i]) for i in indices if i not in (a, b)]
        fixed = _combine(source.theta0, fixed_terms)  # θ0 + F
        refs: Dict[int, List[torch.Tensor]] = {}
        with reporter.task("references θ0 + α_t τ_t + F", total=2 * grid) as bar:
            for t in (a, b):
                refs[t] = []
                for alpha in alphas:
                    refs[t].append(_predict(source.adapter, _combine(fixed, [(float(alpha), taus[t])]), data[t], tasks[t]))
                    bar.advance()
        xi = np.zeros((grid, grid))  # xi[i, j] = ξ(α1 = alphas[i], α2 = alphas[j])
        with reporter.task(f"ξ on a {grid}×{grid} grid ({learner})", total=grid * grid) as bar:
            for i, a1 in enumerate(alphas):
                for j, a2 in enumerate(alphas):
                    merged = _combine(fixed, [(float(a1), taus[a]), (float(a2), taus[b])])
                    source.adapter.set_state(merged)
                    value = 0.0
                    for t, k in ((a, i), (b, j)):
                        pred = source.adapter.predict(data[t], tasks[t])
                        value += float((pred != refs[t][k]).float().mean())
                    xi[i, j] = value
                    bar.advance()
    source.adapter.set_state(source.theta0)
    return {"learner": learner, "benchmark": source.benchmark_name, "order": source.order,
            "tasks": [tasks[a].name, tasks[b].name], "others": others,
            "others_alpha": others_alpha if others == "fixed" else None, "others_alpha_scores": scores,
            "other_tasks": [tasks[i].name for i in indices if i not in (a, b)] if others == "fixed" else [],
            "alphas": alphas.tolist(), "xi": xi.tolist(), "eval_n": {tasks[t].name: len(data[t]) for t in (a, b)},
            "definition": "xi[i][j] = sum over the two tasks of the share of test examples whose predicted label "
                          "differs between theta0 + a1*tau1 + a2*tau2 + F and theta0 + a_t*tau_t + F; "
                          "a1 = alphas[i], a2 = alphas[j]; F = 0 (absent) or others_alpha * sum of other tasks' tau"}



def parse_alpha(text: str) -> Optional[float]:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--others-alpha must be 'auto' or a number; got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"--others-alpha must be finite; got {text!r}")
    return value
