"""``cl-merge plan GRID.toml ...``: what a grid will cost before it is launched (docs/grids.md, "Cost
plan"): counts from ``grid.cost`` (the runs' own code), device-hours from per-phase seconds measured here
(``calibration.measure_for``) or read from ``--calibration FILE``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.console import Console
from rich.table import Table

from .cli import out
from .errors import UserError

PHASE_TITLES = {"setup": "setup", "fit": "fine-tune", "eval": "evaluation", "merge": "merge", "sar": "SAR",
                "fisher": "Fisher", "checkpoint": "checkpoint + cache writes"}


def _h(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    hours = seconds / 3600
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:,.2f}" if hours >= 0.01 else f"{seconds:,.1f} s"


def _n(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _sum(values) -> Optional[float]:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _console() -> Console:
    # a log file or pipe gets the full table width rather than rich's 80-column default
    return out if out.is_terminal else Console(width=160, force_terminal=False, highlight=False)


def build_plan(paths: Sequence[Path], calibration_file: Optional[Path], measure: bool,
               save_calibration: Optional[Path], log=lambda text: None) -> Dict[str, Any]:
    """The plan of ``paths`` (grid files, their runs together) as a dict (also the --json output)."""
    from . import leaderboard as lb
    from .calibration import load_calibration, measurable, measure_for, merge_into, price, save_calibration as save
    from .grid.cost import count_cached, grid_cost

    grids, costs = [], []
    for path in paths:
        grid = lb.load_grid(path)
        configs = lb.expand(grid)  # every name and override checked, as a launch would
        cost = grid_cost(configs, grid.out)
        cost.cached = count_cached(cost, grid.out)
        grids.append(grid)
        costs.append(cost)
    runs = [r for c in costs for r in c.runs]
    by_key: Dict[str, List] = defaultdict(list)
    for r in runs:
        by_key[r.calibration_key].append(r.config)

    calibration = load_calibration(calibration_file) if calibration_file else None
    if measure or save_calibration:
        missing = {k: v for k, v in by_key.items()
                   if (calibration is None or k not in calibration.models) and measurable(v[0].benchmark)}
        if missing:
            calibration = merge_into(calibration, measure_for(missing, log=log, existing=calibration))
    if save_calibration:
        if calibration is None or not calibration.models:
            raise UserError("nothing to save: no model of these grids can be calibrated on this machine; "
                            "give --calibration FILE")
        save(calibration, save_calibration)
    models = calibration.models if calibration else {}
    for r in runs:
        r.seconds = price(r, models.get(r.calibration_key))

    def counts(rs) -> Dict[str, Any]:
        return {"runs": len(rs), "experts_trained": sum(r.fits_trained for r in rs),
                "experts_from_cache": sum(r.fits_cached for r in rs),
                "fine_tune_steps": sum(r.fine_tune_steps for r in rs),
                "test_evals": sum(r.test_evals for r in rs), "val_evals": sum(r.val_evals for r in rs),
                "merge_validation_evals": sum(r.merge_val_evals for r in rs),
                "test_samples": _sum(r.test_samples for r in rs), "val_samples": _sum(r.val_samples for r in rs),
                "merges": sum(r.merges for r in rs), "sar_steps": sum(r.sar_steps for r in rs),
                "sar_scores": sum(r.sar_scores for r in rs), "fishers": sum(r.fishers for r in rs),
                "seconds": {p: _sum(r.seconds.get(p) for r in rs) for p in PHASE_TITLES},
                "total_seconds": _sum(r.total_seconds for r in rs)}

    def grouped(key) -> Dict[str, Any]:
        groups: Dict[Any, list] = defaultdict(list)
        for r in runs:
            groups[key(r)].append(r)
        return {str(k): counts(v) for k, v in groups.items()}

    todo = [r for r in runs if not r.finished]
    return {
        "grids": [str(p) for p in paths],
        "calibration": {"machine": calibration.machine if calibration else None,
                        "models": {k: (vars(models[k]) if k in models else None) for k in by_key},
                        "source": str(calibration_file) if calibration_file else ("measured here" if models else None)},
        "distinct_experts": sum(c.distinct_experts for c in costs),
        "shared_experts": sum(len(c.experts) for c in costs),
        "own_experts": sum(c.own_experts for c in costs),
        "shared_experts_cached": _sum(c.cached for c in costs),
        "finished_runs": len(runs) - len(todo),
        "total": counts(runs),
        "to_run": counts(todo),
        "by_strategy": grouped(lambda r: f"{r.label} ({r.config.protocol})"),
        "by_T": grouped(lambda r: r.T),
        "by_model": grouped(lambda r: r.calibration_key),
        "orders": sorted({str(r.config.order) for r in runs}),
        "runs": [{"run_id": r.config.run_id(), "strategy": r.label, "protocol": r.config.protocol, "T": r.T,
                  "model": r.calibration_key, "finished": r.finished, "experts_trained": r.fits_trained,
                  "experts_from_cache": r.fits_cached, "fine_tune_steps": r.fine_tune_steps,
                  "test_evals": r.test_evals, "val_evals": r.val_evals, "test_samples": r.test_samples,
                  "val_samples": r.val_samples, "merges": r.merges, "sar_steps": r.sar_steps,
                  "sar_scores": r.sar_scores, "fishers": r.fishers, "seconds": r.seconds} for r in runs],
    }


def render(plan: Dict[str, Any], console: Console) -> None:
    total, todo = plan["total"], plan["to_run"]
    cached = plan["shared_experts_cached"]
    console.print(f"[bold]plan[/] of {', '.join(plan['grids'])}: {total['runs']} runs "
                  f"({plan['finished_runs']} already have result files), T ∈ {{{', '.join(sorted(plan['by_T'], key=int))}}}, "
                  f"{len(plan['orders'])} order(s)", highlight=False)
    console.print(f"distinct experts to train: {plan['distinct_experts']:,} ({plan['shared_experts']:,} shared through "
                  f"the expert cache, {'unknown how many' if cached is None else f'{cached:,}'} of them already cached; "
                  f"{plan['own_experts']:,} trained inside sequential / stateful runs)", highlight=False)

    t = Table(title="counts", title_justify="left")
    t.add_column("quantity")
    t.add_column("whole grid", justify="right")
    t.add_column("runs still to do", justify="right")
    rows = [("runs", "runs"), ("experts trained", "experts_trained"), ("experts read from the cache", "experts_from_cache"),
            ("fine-tuning steps", "fine_tune_steps"), ("test evaluation passes", "test_evals"),
            ("  images/examples evaluated (test)", "test_samples"),
            ("validation passes (final row + merge search)", "val_evals"),
            ("  of which merge search (alpha_grid)", "merge_validation_evals"),
            ("  images/examples evaluated (val)", "val_samples"), ("merges", "merges"),
            ("SAR bases (one per merge)", "sar_steps"), ("SAR task scores", "sar_scores"), ("Fisher diagonals", "fishers")]
    for title, key in rows:
        t.add_row(title, _n(total[key]), _n(todo[key]))
    console.print(t)

    t = Table(title="device-hours by phase (whole grid)", title_justify="left")
    t.add_column("phase")
    for key in plan["by_model"]:
        t.add_column(key, justify="right")
    t.add_column("total", justify="right")
    for phase, title in PHASE_TITLES.items():
        t.add_row(title, *[_h(g["seconds"][phase]) for g in plan["by_model"].values()], _h(total["seconds"][phase]))
    t.add_row("[bold]all phases[/]", *[_h(g["total_seconds"]) for g in plan["by_model"].values()],
              f"[bold]{_h(total['total_seconds'])}[/]")
    t.add_row("runs still to do", *["" for _ in plan["by_model"]], _h(todo["total_seconds"]))
    console.print(t)

    for title, groups, label in (("by strategy", plan["by_strategy"], "strategy"),
                                 ("by number of tasks T", plan["by_T"], "T")):
        t = Table(title=title, title_justify="left")
        for col in (label, "runs", "experts trained", "FT steps", "eval passes", "images", "merges", "SAR scores",
                    "fit h", "eval h", "merge h", "SAR h", "total h"):
            t.add_column(col, justify="left" if col == label else "right")
        for name, g in sorted(groups.items(), key=lambda kv: (int(kv[0]) if kv[0].isdigit() else 0, kv[0])):
            t.add_row(name, _n(g["runs"]), _n(g["experts_trained"]), _n(g["fine_tune_steps"]),
                      _n(g["test_evals"] + g["val_evals"]),
                      _n(_sum([g["test_samples"], g["val_samples"]])), _n(g["merges"]), _n(g["sar_scores"]),
                      _h(g["seconds"]["fit"]), _h(g["seconds"]["eval"]), _h(g["seconds"]["merge"]),
                      _h(g["seconds"]["sar"]), _h(g["total_seconds"]))
        console.print(t)
    n_orders = max(len(plan["orders"]), 1)
    if total["total_seconds"] is not None:
        console.print(f"per order: {_h(total['total_seconds'] / n_orders)} device-hours (× {n_orders} orders); "
                      "evaluation grows as T² per continual run, fine-tuning as T per distinct expert", highlight=False)

    calib = plan["calibration"]
    console.print(f"[bold]calibration[/]: {calib['source'] or 'none (counts only)'}"
                  + (f" — {calib['machine'].get('device_name')} ({calib['machine'].get('device')}, "
                     f"{calib['machine'].get('torch_threads')} threads, {calib['machine'].get('clock', 'wall')} clock, "
                     f"{calib['machine'].get('created')})"
                     if calib.get("machine") else ""), highlight=False)
    for key, costs in calib["models"].items():
        if costs is None:
            console.print(f"  {key}: no phase costs (not measurable offline here); give --calibration FILE "
                          "with this key to price it", highlight=False)
            continue
        for phase, note in sorted(costs.get("notes", {}).items()):
            console.print(f"  {key} {phase}: {note}", highlight=False)
    console.print("  not priced: dataset download / preparation, data-loader stalls, result files, "
                  "queueing between runs", highlight=False)


def cmd_plan(args) -> int:
    from .io import write_json_atomic

    for path in args.grids:
        if not Path(path).exists():
            raise UserError(f"no such grid file: {path}")
    if args.json is not None and Path(args.json).is_dir():
        raise UserError(f"{args.json} is a directory; give a file path for --json")
    if args.clock == "cpu":
        import time

        from . import calibration

        calibration.CLOCK = time.process_time
    plan = build_plan(args.grids, args.calibration, measure=not args.counts_only and args.calibration is None,
                      save_calibration=args.save_calibration,
                      log=lambda text: out.print(f"[dim]{text}[/]", highlight=False))
    render(plan, _console())
    if args.json is not None:
        write_json_atomic(Path(args.json), json.loads(json.dumps(plan, default=str)))
        out.print(f"json: {args.json}", highlight=False)
    if args.save_calibration:
        out.print(f"calibration: {args.save_calibration}", highlight=False)
    return 0
