"""The SAIM paper's analysis figures as PNG files (matplotlib, Agg canvas; no display needed).

- ``matrix``: the accuracy matrix of one run as a heatmap (paper Fig. 4): row t = after learning
  task t (row θ0 = pre-trained), column = evaluated task.
- ``curves``: ACC and SAR versus the number of tasks learned (Fig. 6). ACC after step t is the mean
  accuracy of the deployed model over the t tasks seen so far, A[t][1..t] — read from the full
  accuracy matrix of each run, so one run of T tasks gives the whole curve (no T-prefix reruns).
  SAR after step t is the run's ``sar[t]`` (mean over seen tasks with run.sar_store=true, else the
  current task's). Runs are grouped like the leaderboard (strategy, protocol, T, hyperparameters);
  lines are the mean over the group's orders/seeds, shaded ± one sample std.
- ``delta-hist``: histograms of log10 |expert − θ0| over all trainable parameters, one panel per
  learner, one line per task (Fig. 2). Exactly unchanged parameters (log of 0) are counted and
  reported in the legend instead of binned.
- ``disentanglement``: ξ(α1, α2) on a grid (default 21 × 21 over [−0.5, 1.5]², Fig. 3 and 5) for a
  pair of tasks with the others' task vectors absent (Eq. 13) or fixed (Eq. 35)::

      θ_merged = θ0 + α1 τ1 + α2 τ2 + F,      θ_t^ref = θ0 + α_t τ_t + F,
      ξ(α1, α2) = Σ_{t=1,2} mean_{x ∈ X_t} 1[argmax f(x; θ_t^ref) ≠ argmax f(x; θ_merged)]

  with F = 0 (absent) or F = Σ_{s∉pair} α_s τ_s (fixed). dist is prediction disagreement (the
  0/1 distance between predicted labels, as in the weight-disentanglement literature), so ξ ∈ [0, 2].
  α_s is one coefficient for every other task: given, or ``auto`` = the value in 0.1..1.0 whose
  task-arithmetic model θ0 + α Σ_all τ has the best mean validation accuracy over the stream
  (the paper grid-searches α_s for the best average accuracy). τ = expert − θ0 of independently
  fine-tuned experts (the protocol's expert cache is reused). X_t = the first ``eval_n`` examples of
  task t's test split.

The numbers are computed in ``cl_merge.figure_data`` from experts of ``cl_merge.figure_experts``;
this module draws them. Every PNG carries its title and axis labels in its metadata (``Title``, ``Description``), and is
written to a temporary file first, then moved into place.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError
from .figure_data import (AUTO_ALPHAS, GRID_HI, GRID_LO, GRID_N, HIST_HI, HIST_LO,  # noqa: F401  (re-exported)
                          choose_others_alpha, delta_hist_data, disentanglement_data, parse_alpha)
from .figure_experts import DEFAULT_CACHE, ExpertSource  # noqa: F401  (re-exported)


# ---- figures and files ----------------------------------------------------------------------------
def new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def describe(fig) -> str:
    parts = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        parts.append(f"[{ax.get_title()}] x: {ax.get_xlabel()}; y: {ax.get_ylabel()}")
    return " | ".join(parts)


def set_title(fig, text: str) -> None:
    fig.suptitle(text)
    fig.cl_merge_title = text


def title_of(fig) -> str:
    return getattr(fig, "cl_merge_title", None) or (fig.axes[0].get_title() if fig.axes else "")


def check_png_path(path: os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {path} must end in .png")
    if path.exists() and path.is_dir():
        raise UserError(f"--out {path} is a directory; give a .png file path")
    return path


def save_png(fig, path: os.PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically; title and axis labels go into the PNG metadata."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = check_png_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    title = title_of(fig)
    from .io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight", metadata={
        "Title": title, "Description": describe(fig), "Software": "cl_merge"}), suffix=".tmp.png")
    return path


# ---- accuracy matrix (Fig. 4) -------------------------------------------------------------------
def pick_result(path: os.PathLike, strategy: Optional[str] = None, order: Optional[str] = None,
                num_tasks: Optional[int] = None) -> Dict[str, Any]:
    """One result: ``path`` itself, or the single run under a directory matching the filters."""
    from .results import find_results, load_result

    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise UserError(f"no such result file or directory: {path}")
        return load_result(path)
    found = [load_result(f) for f in find_results([path])]
    chosen = [r for r in found if (strategy is None or r["strategy"] == strategy)
              and (order is None or str(r["order"]) == str(order))
              and (num_tasks is None or len(r["tasks"]) == num_tasks)]
    if len(chosen) != 1:
        what = ", ".join(f"{k} {v}" for k, v in (("strategy", strategy), ("order", order), ("T", num_tasks)) if v is not None)
        raise UserError(f"{len(chosen)} runs under {path} match {what or 'no filter'}; narrow it down with "
                        "--strategy, --order and --num-tasks, or pass one result file")
    return chosen[0]


def matrix_figure(result: Dict[str, Any]):
    tasks = result["tasks"]
    T = len(tasks)
    data = np.array([[np.nan if v is None else 100.0 * v for v in row] for row in result["acc_matrix"]], dtype=float)
    size = max(4.0, 0.55 * T + 2.5)
    fig, (ax,) = new_figure(size + 1.2, size)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    ax.set_xticks(range(T), [n[:14] for n in tasks], rotation=45, ha="right")
    ax.set_yticks(range(T + 1), ["θ0"] + [f"{t}: {n[:14]}" for t, n in enumerate(tasks, start=1)])
    if T <= 20:
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 60 else "white")
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after learning task")
    ax.set_title(f"Accuracy matrix (%) — {result['strategy']} ({result['protocol']}), {result['benchmark']} "
                 f"order {result['order']}, seed {result['seed']}")
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label("accuracy (%)")
    return fig


# ---- ACC and SAR curves (Fig. 6) --------------------------------------------------------------------
def seen_acc_curve(result: Dict[str, Any]) -> List[float]:
    """ACC after step t over the tasks seen so far: mean_{i≤t} A[t][i], t = 1..T."""
    m = result["acc_matrix"]
    return [float(np.mean([m[t][i] for i in range(t)])) for t in range(1, len(m))]


def sar_curve(result: Dict[str, Any]) -> List[Optional[float]]:
    return list(result.get("sar") or [])


def _band(curves: Sequence[Sequence[Optional[float]]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x = 1..L, the mean over curves and the sample std (0 where fewer than two values)."""
    length = max(len(c) for c in curves)
    arr = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        arr[i, :len(c)] = [np.nan if v is None else v for v in c]
    mean = np.full(length, np.nan)
    std = np.zeros(length)
    for j in range(length):
        col = arr[:, j][~np.isnan(arr[:, j])]
        if col.size:
            mean[j] = col.mean()
        if col.size > 1:
            std[j] = col.std(ddof=1)
    return np.arange(1, length + 1), mean, std


def curves_figure(results: Sequence[Dict[str, Any]]):
    from .leaderboard import aggregate

    rows = aggregate(results)
    fig, (ax_acc, ax_sar) = new_figure(11.0, 4.2, ncols=2)
    scopes = set()
    many_T = len({r.T for r in rows}) > 1
    for row in rows:
        extra = [row.protocol] if len({r.protocol for r in rows if r.name == row.name}) > 1 else []
        extra += [f"T={row.T}"] if many_T else []
        label = f"{row.name} ({', '.join(extra)})" if extra else row.name
        x, mean, std = _band([seen_acc_curve(r) for r in row.runs])
        line, = ax_acc.plot(x, 100 * mean, marker="o", markersize=3, label=label)
        if row.n > 1:
            ax_acc.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=line.get_color(), alpha=0.15)
        sars = [sar_curve(r) for r in row.runs]
        if any(v is not None for c in sars for v in c):
            scopes |= {r.get("sar_scope") for r in row.runs}
            x, mean, std = _band(sars)
            ax_sar.plot(x, mean, marker="o", markersize=3, color=line.get_color(), label=label)
            if row.n > 1:
                ax_sar.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ns = sorted({row.n for row in rows})
    benches = ", ".join(sorted({r.benchmark for r in rows}))
    for ax in (ax_acc, ax_sar):
        ax.set_xlabel("number of tasks learned")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.set_ylabel("ACC over seen tasks (%)")
    ax_acc.set_title("test accuracy")
    scope = {"seen_tasks": "mean over seen tasks", "current_task": "current task"}
    ax_sar.set_ylabel("SAR (" + (scope.get(next(iter(scopes)), "mixed") if len(scopes) == 1 else "mixed scopes") + ")"
                      if scopes else "SAR (not recorded)")
    ax_sar.set_title("subspace alignment ratio")
    ax_acc.legend(fontsize=8)
    set_title(fig, f"ACC and SAR vs number of tasks — {benches} (mean ± std over {'/'.join(map(str, ns))} runs)")
    return fig


# ---- |Δθ| histograms (Fig. 2) ----------------------------------------------------------------------
def delta_hist_figure(data: Dict[str, Any]):
    learners = list(data["learners"])
    edges = np.asarray(data["edges"])
    shares = [np.asarray(d["counts"]) / max(d["count"], 1) for per in data["learners"].values() for d in per.values()]
    occupied = np.nonzero(np.max(shares, axis=0) >= 1e-4)[0]  # bins holding at least 0.01% of some expert
    lo, hi = (edges[occupied[0]], edges[occupied[-1] + 1]) if occupied.size else (edges[0], edges[-1])
    fig, axes = new_figure(5.2 * len(learners), 4.0, ncols=len(learners))
    ymax = 0.0
    for idx, (ax, name) in enumerate(zip(axes, learners)):
        for task, d in data["learners"][name].items():
            share = 100.0 * np.asarray(d["counts"]) / max(d["count"], 1)
            ymax = max(ymax, float(share.max()) if share.size else 0.0)
            median = "–" if d["median"] is None else f"{d['median']:.2f}"
            ax.stairs(share, edges, label=f"{task} (median {median}, {100 * d['unchanged']:.0f}% unchanged)")
        ax.set_xlim(lo - 0.2, hi + 0.2)
        ax.set_title(f"({chr(ord('a') + idx)}) {name}")
        ax.set_xlabel("log10 |Δθ|")
        ax.set_ylabel("share of parameters (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylim(0, ymax * 1.08 if ymax > 0 else 1.0)
    set_title(fig, f"Parameter changes after fine-tuning from θ0 — {data['benchmark']}, order {data['order']}")
    return fig


# ---- weight disentanglement (Fig. 3 and 5, Eq. 13 and 35) -----------------------------------------------
def disentanglement_figure(panels: Sequence[Dict[str, Any]]):
    fig, axes = new_figure(5.6 * len(panels) + 1.5, 4.4, ncols=len(panels))
    vmax = max(max(max(row) for row in p["xi"]) for p in panels)
    vmax = max(math.ceil(vmax * 20.0) / 20.0, 0.05)  # shared colour scale, rounded up to 0.05
    levels = np.linspace(0.0, vmax, 21)
    image = None
    for idx, (ax, p) in enumerate(zip(axes, panels)):
        alphas = np.array(p["alphas"])
        z = np.array(p["xi"]).T  # rows: α2 (y), columns: α1 (x)
        image = ax.contourf(alphas, alphas, z, levels=levels, cmap="viridis")  # dark = low error
        ax.plot([1.0], [1.0], marker="+", color="red", markersize=10)
        ax.set_xlabel(f"α1 ({p['tasks'][0]})")
        ax.set_ylabel(f"α2 ({p['tasks'][1]})")
        ax.set_title(f"({chr(ord('a') + idx)}) {p['learner']}")
        ax.set_aspect("equal")
        ticks = [t for t in np.arange(-0.5, 1.51, 0.5) if alphas[0] - 1e-9 <= t <= alphas[-1] + 1e-9]
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
    cbar = fig.colorbar(image, ax=list(axes), format="%.2f")
    cbar.set_label("ξ (prediction disagreement, summed over both tasks)")
    p = panels[0]
    if p["others"] == "fixed":
        others = f"other {len(p['other_tasks'])} tasks fixed at α={p['others_alpha']:g} (Eq. 35)"
    else:
        others = "other tasks absent (Eq. 13)"
    set_title(fig, f"Weight disentanglement error ξ(α1, α2) — {p['tasks'][0]} + {p['tasks'][1]}, {others}")
    return fig
