"""The SAIM paper's analysis figures as PNG, PDF or SVG files, chosen by the output's extension
(matplotlib, Agg canvas; no display needed). Colours and markers are fixed per strategy
(``cl_merge.figure_style``), legends sit outside the axes.

- ``matrix``: the accuracy matrix of one run as a heatmap (paper Fig. 4): row t = after learning
  task t (row θ0 = pre-trained), column = evaluated task.
- ``curves``: ACC and SAR versus the number of tasks learned (Fig. 6). ACC after step t is the mean
  accuracy of the deployed model over the t tasks seen so far, A[t][1..t] — read from the full
  accuracy matrix of each run, so one run of T tasks gives the whole curve (no T-prefix reruns).
  SAR after step t is the run's ``sar[t]`` (mean over seen tasks with run.sar_store=true, else the
  current task's). Runs are grouped like the leaderboard (strategy, protocol, T, hyperparameters);
  lines are the mean over the group's orders/seeds, shaded ± one sample std.
- ``delta-hist``: histograms of log10 |expert − θ0| over all trainable parameters, one panel per
  learner, one line per task (Fig. 2). Exactly unchanged parameters (log of 0) are counted, not
  binned, and their share is written in each panel.
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
this module draws them. Every file carries its title and axis labels in its metadata (PNG/SVG
``Title`` and ``Description``, PDF ``Title`` and ``Subject``), no dates (a regenerated figure is
byte-identical), and is written to a temporary file first, then moved into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError
from .figure_data import (AUTO_ALPHAS, GRID_HI, GRID_LO, GRID_N, HIST_HI, HIST_LO,  # noqa: F401  (re-exported)
                          choose_others_alpha, delta_hist_data, disentanglement_data, parse_alpha)
from .figure_experts import DEFAULT_CACHE, ExpertSource  # noqa: F401  (re-exported)
from .figure_style import BAND_ALPHA, LINESTYLES, PALETTE, PNG_DPI, RC, format_of, metadata, styles_for


# ---- figures and files ----------------------------------------------------------------------------
def new_figure(width: float, height: float, ncols: int = 1):
    """A figure with constrained layout (legends placed outside the axes get their own room)."""
    from matplotlib.figure import Figure

    with style_context():
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def style_context():
    import matplotlib

    return matplotlib.rc_context(RC)


def describe(fig) -> str:
    parts = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        parts.append(f"[{ax.get_title()}] x: {ax.get_xlabel()}; y: {ax.get_ylabel()}")
    return " | ".join(parts)


def set_title(fig, text: str) -> None:
    """The figure's title; a line break in it becomes " — " in the file's metadata."""
    with style_context():
        fig.suptitle(text)
    fig.cl_merge_title = text.replace("\n", " — ")


def title_of(fig) -> str:
    return getattr(fig, "cl_merge_title", None) or (fig.axes[0].get_title() if fig.axes else "")


def check_out_path(path: os.PathLike) -> Path:
    """``--out``: a .png, .pdf or .svg file path (the extension picks the format)."""
    path = Path(path)
    format_of(path)
    if path.exists() and path.is_dir():
        raise UserError(f"--out {path} is a directory; give a .png, .pdf or .svg file path")
    return path


def save_figure(fig, path: os.PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically in the format of its extension (PNG at 200 dpi, PDF, SVG).
    Title and axis labels go into the file's metadata; no dates, so a regenerated file is identical."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = check_out_path(path)
    fmt = format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    info = metadata(fmt, title_of(fig), describe(fig))
    from .io import atomic_write

    with style_context():
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches="tight",
                                                   metadata=info), suffix=f".tmp.{fmt}")
    return path


def figure_bytes(fig, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes (the HTML report embeds them), same settings as ``save_figure``."""
    import io as _io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = _io.BytesIO()
    with style_context():
        fig.savefig(buf, format=fmt, dpi=PNG_DPI if fmt == "png" else 100, bbox_inches="tight",
                    metadata=metadata(fmt, title_of(fig), describe(fig)))
    return buf.getvalue()


# names older code imports
check_png_path, save_png = check_out_path, save_figure


# ---- accuracy matrix (Fig. 4) -------------------------------------------------------------------
def pick_result(path: os.PathLike, strategy: Optional[str] = None, order: Optional[str] = None,
                num_tasks: Optional[int] = None) -> Dict[str, Any]:
    """One result: ``path`` itself, or the single run matching the filters under a directory or among
    a grid file's runs."""
    from .results import load_result
    from .run_sets import load_runs

    path = Path(path)
    if not path.is_dir() and path.suffix.lower() != ".toml":
        if not path.exists():
            raise UserError(f"no such result file or directory: {path}")
        return load_result(path)
    found = load_runs([path])
    chosen = [r for r in found if (strategy is None or r["strategy"] == strategy)
              and (order is None or str(r["order"]) == str(order))
              and (num_tasks is None or len(r["tasks"]) == num_tasks)]
    if len(chosen) != 1:
        what = ", ".join(f"{k} {v}" for k, v in (("strategy", strategy), ("order", order), ("T", num_tasks)) if v is not None)
        raise UserError(f"{len(chosen)} runs under {path} match {what or 'no filter'}; narrow it down with "
                        "--strategy, --order and --num-tasks, or pass one result file")
    return chosen[0]


def matrix_rows(result: Dict[str, Any]) -> Tuple[List[str], np.ndarray]:
    """Row labels and values (%) of the accuracy-matrix figure: θ0, one row per step (multitask: the
    one merged model), then the experts' accuracy on their own task (``expert_acc``)."""
    tasks = result["tasks"]
    data = [[np.nan if v is None else 100.0 * v for v in row] for row in result["acc_matrix"]]
    if result.get("protocol") == "multitask":  # two rows: θ0 and the one merge of every expert
        labels = ["θ0", "merged (all at once)"]
    else:
        labels = ["θ0"] + [f"{t}: {n}" for t, n in enumerate(tasks, start=1)][:len(data) - 1]
    data.append([np.nan if v is None else 100.0 * v for v in result["expert_acc"]]
                + [np.nan] * (len(tasks) - len(result["expert_acc"])))
    labels.append("expert (own task)")
    return labels, np.array(data, dtype=float)


def summary_text(result: Dict[str, Any]) -> str:
    def pct(key):
        v = result.get(key)
        return "–" if v is None else f"{100 * v:.1f}"

    parts = [f"ACC {pct('acc')}"]
    if result.get("protocol") != "multitask":
        parts.append(f"BWT {pct('bwt')}")
    parts.append(f"norm. ACC {pct('normalized_acc')}")
    return ", ".join(parts)


def matrix_figure(result: Dict[str, Any]):
    """The accuracy matrix as a heatmap: diagonal cells (task t right after it was learned) outlined,
    the experts' row below a separating line, ACC/BWT in the title."""
    from matplotlib.patches import Rectangle

    tasks = result["tasks"]
    T = len(tasks)
    labels, data = matrix_rows(result)
    steps = len(data) - 2  # rows after θ0, before the expert row
    size = max(4.0, 0.55 * T + 2.5)
    fig, (ax,) = new_figure(size + 1.4, size + 0.4)
    with style_context():
        image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
        ax.set_xticks(range(T), list(tasks), rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        if T <= 20:
            for (i, j), v in np.ndenumerate(data):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 60 else "white")
        if result.get("protocol") != "multitask":
            for t in range(1, steps + 1):  # row t, column t-1: task t right after it was learned
                ax.add_patch(Rectangle((t - 1.5, t - 0.5), 1, 1, fill=False, edgecolor="#D55E00", linewidth=1.6))
        ax.axhline(len(data) - 1.5, color="white", linewidth=3)  # the expert row is not a step
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after learning task")
        diagonal = "; outlined: each task right after it was learned" if result.get("protocol") != "multitask" else ""
        fig.supxlabel(f"last row: each task's expert on its own task{diagonal}", fontsize=7)
        cbar = fig.colorbar(image, ax=ax)
        cbar.set_label("accuracy (%)")
    set_title(fig, f"Accuracy matrix (%) — {result['strategy']} ({result['protocol']}), {result['benchmark']} "
                   f"order {result['order']}, seed {result['seed']}\n{summary_text(result)}")
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


def spread_text(rows) -> str:
    """What "± std" is taken over, in words: task orders (and seeds, when they vary)."""
    counts = sorted({(len({str(r["order"]) for r in row.runs}), len({r["seed"] for r in row.runs})) for row in rows})
    orders = "/".join(str(n) for n in sorted({o for o, _ in counts}))
    seeds = sorted({s for _, s in counts})
    if seeds == [1]:
        return f"mean ± std over {orders} task order{'' if orders == '1' else 's'}"
    return f"mean ± std over {orders} task orders × {'/'.join(map(str, seeds))} seeds"


def curves_figure(results: Sequence[Dict[str, Any]]):
    """ACC over seen tasks and SAR per step, one line per leaderboard row (colour and marker fixed
    per strategy, line style per variant); multitask rows, which have no steps, are single points at
    x = T (the one merge of all T experts)."""
    from .leaderboard import aggregate

    rows = aggregate(results)
    styles = styles_for(row.strategy for row in rows)
    fig, (ax_acc, ax_sar) = new_figure(11.0, 4.2, ncols=2)
    scopes = set()
    many_T = len({r.T for r in rows}) > 1
    variants: Dict[str, int] = {}
    with style_context():
        for row in rows:
            extra = [row.protocol] if len({r.protocol for r in rows if r.strategy == row.strategy}) > 1 else []
            extra += [f"T={row.T}"] if many_T else []
            label = f"{row.name} ({', '.join(extra)})" if extra else row.name
            style = styles[row.strategy]
            linestyle = LINESTYLES[variants.setdefault(row.strategy, 0) % len(LINESTYLES)]
            variants[row.strategy] += 1
            if row.protocol == "multitask":  # one merge: a point at T (ACC over all tasks, SAR over all tasks)
                accs = [float(np.mean(r["acc_matrix"][-1])) for r in row.runs]
                sars = [(r.get("sar") or [None])[-1] for r in row.runs]
                sars = [v for v in sars if v is not None]
                std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
                ax_acc.errorbar([row.T], [100 * np.mean(accs)], yerr=[100 * std], linestyle="none",
                                markersize=6, markerfacecolor="white", label=f"{label}, all at once", **style.kwargs())
                if sars:
                    ax_sar.errorbar([row.T], [np.mean(sars)], yerr=[np.std(sars, ddof=1) if len(sars) > 1 else 0.0],
                                    linestyle="none", markersize=6, markerfacecolor="white", **style.kwargs())
                continue
            x, mean, std = _band([seen_acc_curve(r) for r in row.runs])
            ax_acc.plot(x, 100 * mean, markersize=4, linestyle=linestyle, label=label, **style.kwargs())
            if row.n > 1:
                ax_acc.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=style.color, alpha=BAND_ALPHA,
                                    linewidth=0)
            sars = [sar_curve(r) for r in row.runs]
            if any(v is not None for c in sars for v in c):
                scopes |= {r.get("sar_scope") for r in row.runs}
                x, mean, std = _band(sars)
                ax_sar.plot(x, mean, markersize=4, linestyle=linestyle, label=label, **style.kwargs())
                if row.n > 1:
                    ax_sar.fill_between(x, mean - std, mean + std, color=style.color, alpha=BAND_ALPHA, linewidth=0)
        benches = ", ".join(sorted({r.benchmark for r in rows}))
        for ax in (ax_acc, ax_sar):
            ax.set_xlabel("number of tasks learned")
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_acc.set_ylabel("ACC over seen tasks (%)")
        ax_acc.set_title("test accuracy")
        scope = {"seen_tasks": "mean over seen tasks", "current_task": "current task"}
        scopes.discard(None)
        if not scopes and any(r.protocol == "multitask" for r in rows):
            scopes = {"seen_tasks"}  # a multitask merge's SAR is over all T tasks, i.e. every seen task at T
        ax_sar.set_ylabel("SAR (" + (scope.get(next(iter(scopes)), "mixed") if len(scopes) == 1 else "mixed scopes") + ")"
                          if scopes else "SAR (not recorded)")
        ax_sar.set_title("subspace alignment ratio")
        fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside right upper")  # never over a line
    set_title(fig, f"ACC and SAR vs number of tasks — {benches} ({spread_text(rows)})")
    return fig


# ---- |Δθ| histograms (Fig. 2) ----------------------------------------------------------------------
def delta_hist_figure(data: Dict[str, Any]):
    """One panel per learner, one line per task (colour fixed per task); the headline — the share of
    coordinates left exactly unchanged, which a log histogram cannot bin — is written in each panel."""
    learners = list(data["learners"])
    edges = np.asarray(data["edges"])
    shares = [np.asarray(d["counts"]) / max(d["count"], 1) for per in data["learners"].values() for d in per.values()]
    occupied = np.nonzero(np.max(shares, axis=0) >= 1e-4)[0]  # bins holding at least 0.01% of some expert
    lo, hi = (edges[occupied[0]], edges[occupied[-1] + 1]) if occupied.size else (edges[0], edges[-1])
    tasks = list(dict.fromkeys(t for per in data["learners"].values() for t in per))
    colours = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(tasks)}
    fig, axes = new_figure(5.2 * len(learners), 4.0, ncols=len(learners))
    ymax = 0.0
    with style_context():
        for idx, (ax, name) in enumerate(zip(axes, learners)):
            lines = []
            for task, d in data["learners"][name].items():
                share = 100.0 * np.asarray(d["counts"]) / max(d["count"], 1)
                ymax = max(ymax, float(share.max()) if share.size else 0.0)
                ax.stairs(share, edges, color=colours[task], linewidth=1.4, label=task)
                if d["median"] is not None:
                    ax.axvline(d["median"], color=colours[task], linestyle=":", linewidth=1)
                median = "–" if d["median"] is None else f"{d['median']:.2f}"
                lines.append(f"{task}: {100 * d['unchanged']:.1f}%  (median {median})")
            unchanged = [100 * d["unchanged"] for d in data["learners"][name].values()]
            head = (f"{min(unchanged):.0f}%" if round(min(unchanged)) == round(max(unchanged))
                    else f"{min(unchanged):.0f}–{max(unchanged):.0f}%")
            ax.text(0.03, 0.97, f"unchanged (Δθ = 0): {head}", transform=ax.transAxes, fontsize=11,
                    fontweight="bold", va="top")
            lines.append("dotted: medians of the changed coordinates")
            ax.text(0.03, 0.88, "\n".join(lines), transform=ax.transAxes, fontsize=7, va="top", linespacing=1.3)
            ax.set_xlim(lo - 0.2, hi + 0.2)
            ax.set_title(f"({chr(ord('a') + idx)}) {name}")
            ax.set_xlabel("log10 |Δθ|")
            ax.set_ylabel("share of parameters (%)")
            ax.grid(alpha=0.3)
        for ax in axes:
            ax.set_ylim(0, ymax * 1.45 if ymax > 0 else 1.0)  # headroom for the annotation above the bars
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(tasks), 6),
                   title="task (the expert fine-tuned on it)")
    set_title(fig, f"Parameter changes after fine-tuning from θ0 — {data['benchmark']}, order {data['order']}")
    return fig


# ---- weight disentanglement (Fig. 3 and 5, Eq. 13 and 35) -----------------------------------------------
# ξ sums two shares of differing predictions, so it lies in [0, 2]; the levels read as "x% of the
# predictions differ (summed over both tasks)"
XI_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)


def xi_levels(vmax: float) -> List[float]:
    """The fixed levels up to the first one at or above ``vmax`` (at least 0, 0.05)."""
    out = [XI_LEVELS[0]]
    for level in XI_LEVELS[1:]:
        out.append(level)
        if level >= vmax:
            break
    return out


def disentanglement_figure(panels: Sequence[Dict[str, Any]]):
    """Filled contours at a few fixed levels (shared across panels), the same levels as labelled lines,
    and a marked point α1 = α2 = 1 (both task vectors in full: plain task arithmetic)."""
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D

    fig, axes = new_figure(5.0 * len(panels) + 1.5, 4.8, ncols=len(panels))
    vmax = max(max(max(row) for row in p["xi"]) for p in panels)
    levels = xi_levels(vmax)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    norm = BoundaryNorm(levels, cmap.N)
    image = None
    with style_context():
        for idx, (ax, p) in enumerate(zip(axes, panels)):
            alphas = np.array(p["alphas"])
            z = np.array(p["xi"]).T  # rows: α2 (y), columns: α1 (x)
            image = ax.contourf(alphas, alphas, z, levels=levels, cmap=cmap, norm=norm)  # dark = low error
            lines = ax.contour(alphas, alphas, z, levels=levels[1:-1], colors="white", linewidths=0.7)
            ax.clabel(lines, fmt="%g", fontsize=7)
            ax.plot([1.0], [1.0], marker="+", color="#D55E00", markersize=12, markeredgewidth=2, linestyle="none")
            ax.plot([0.0], [0.0], marker="o", color="white", markeredgecolor="black", markersize=5, linestyle="none")
            ax.set_xlabel(f"α1 ({p['tasks'][0]})")
            ax.set_ylabel(f"α2 ({p['tasks'][1]})")
            ax.set_title(f"({chr(ord('a') + idx)}) {p['learner']}")
            ax.set_aspect("equal")
            ticks = [t for t in np.arange(-0.5, 1.51, 0.5) if alphas[0] - 1e-9 <= t <= alphas[-1] + 1e-9]
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
        cbar = fig.colorbar(image, ax=list(axes), ticks=levels, format="%g")
        cbar.set_label("ξ: share of predictions that differ, summed over both tasks (0–2)")
        fig.legend(handles=[
            Line2D([], [], marker="+", color="#D55E00", markersize=10, markeredgewidth=2, linestyle="none",
                   label="α1 = α2 = 1: both task vectors in full (task arithmetic)"),
            Line2D([], [], marker="o", color="white", markeredgecolor="black", markersize=5, linestyle="none",
                   label="α1 = α2 = 0: θ0 (+ F), ξ = 0 by definition")],
            loc="outside lower center", ncols=2)
    p = panels[0]
    if p["others"] == "fixed":
        others = f"other {len(p['other_tasks'])} tasks fixed at α={p['others_alpha']:g} (Eq. 35)"
    else:
        others = "other tasks absent (Eq. 13)"
    set_title(fig, f"Weight disentanglement error ξ(α1, α2) — {p['tasks'][0]} + {p['tasks'][1]}, {others}")
    return fig
