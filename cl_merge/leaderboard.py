"""Leaderboards over task orders: a grid of runs, run locally (finished runs are skipped), then
aggregated from the result files alone.

The grid is a TOML file (paths are relative to the file)::

    benchmark = "mini"
    strategies = "all"              # every registered strategy, or a list of names
    orders = [1, 2, 3, 4, 5]        # or "all"; default: the benchmark's default order
    seeds = [0]                     # default [0]
    num_tasks = [4, 9]              # benchmark.num_tasks per run (T); omit for the full stream
    overrides = ["run.sar_store=true"]   # key=value applied to every run
    out = "mini/runs"               # result files (default: runs/ next to this file)
    markdown = "mini/leaderboard.md"     # optional outputs (the CLI's --markdown/--csv win)
    csv = "mini/leaderboard.csv"
    title = "mini suite"

    [sweep]                         # optional: one run per value (product over keys) of each entry
    "merger.alpha" = {times_default = [0.5, 0.75, 1.0, 1.25, 1.5]}   # relative to each entry's default
    # "learner.lr" = [1e-4, 3e-4]  # or absolute values; entries that lack a key are not swept on it
    select = "val_acc"              # optional: per strategy, keep the swept setting with the best mean
                                    # final-row validation accuracy and report its test figures

    [ray]                           # only for `--engine ray` (cl_merge.ray_engine); all optional
    num_cpus = 1                    # CPUs per run (and per shared-expert training)
    num_gpus = 0.25                 # GPUs per run; fractions pack several runs on one device
    max_retries = 3                 # re-runs after a worker/node died (a run's own error: never)

    [[runs]]                        # more entries: a strategy with its own overrides, or any
    learner = "adam"                # learner x merger (x protocol) combination
    merger = "swa"
    protocol = "sequential"
    overrides = ["learner.lr=3e-4"]
    sweep = {"merger.alpha" = [0.2, 0.3]}   # this entry's own axis (wins over the top-level one)

Selection on validation data (``select = "val_acc"``; SAIM Eq. 12's "validation set search", done
per run, not per step). Every run records ``val_acc``: the final deployed model's accuracy on each
task's validation split. ``select_by_validation`` groups runs by (benchmark, model, strategy,
protocol, T), scores each swept setting by the mean over its runs (orders × seeds) of the mean over
tasks of ``val_acc``, and keeps the best one (ties: the first in sorted order); it reads nothing
else from a result, so the test split never enters the choice. The report then shows the selected
setting's test ACC/BWT (row marked "tuned on val: KEY=VALUE") beside the table at the entries' own
default values (every swept entry also runs at its defaults). With ``times_default`` every merging
strategy's main coefficient is tuned on the same relative grid. Why not ``merger.alpha_grid`` (α per
step on the current task's validation split)? It favours the task just added (measured on mini:
α = 1.0 at 6–7 of 9 steps, BWT −18.8) and compounds through Δ_cum; it stays an option of the
isotropic merger.

``load_grid`` reads and checks the file, ``expand`` turns it into resolved ``RunConfig`` objects
(every name and override is checked before anything runs), ``run_grid`` executes the missing ones
(``runner.execute(..., resume=True)``: a finished run's result file is reused, a killed run continues
from its checkpoint), ``aggregate`` groups result dicts into leaderboard rows. Executors other than
the local loop only need ``expand`` (and ``Grid.ray`` for the Ray engine's resources).

Aggregation: one row per (benchmark, strategy, protocol, T, hyperparameters); ACC, BWT, SAR at the
final step and normalized ACC as mean ± sample standard deviation (n − 1) over the group's runs
(orders × seeds); per-order values (mean over seeds); the worst order = lowest ACC.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import RunConfig, resolve
from .errors import UserError
from .results import load_result

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REFERENCE_TABLE = Path(__file__).resolve().parent.parent / "results" / "reference" / "saim_table1_acc_bwt.csv"
REFERENCE_BENCHMARKS = {"vision20"}
# our strategy names -> the method names of the paper's Table 1
REFERENCE_ALIASES = {"magmax-ind": "magmax", "magmax_ind": "magmax", "c-magmax": "magmax", "c-opcm": "opcm",
                     "ties": "c-ties", "c_ties": "c-ties", "c_ta": "c-ta", "c_ft": "c-ft"}

_TOP_KEYS = {"benchmark", "strategies", "runs", "orders", "seeds", "num_tasks", "overrides", "out",
             "markdown", "csv", "title", "ray", "sweep", "select"}
SELECTIONS = ("val_acc",)
# [ray] table: resources per run and retries after worker death (the local runner ignores it)
RAY_DEFAULTS = {"num_cpus": 1, "num_gpus": 0, "max_retries": 3}
_RUN_KEYS = {"strategy", "learner", "merger", "protocol", "overrides", "sweep"}


# ---- the grid ------------------------------------------------------------------------------------
@dataclasses.dataclass
class GridEntry:
    strategy: Optional[str] = None
    learner: Optional[str] = None
    merger: Optional[str] = None
    protocol: Optional[str] = None
    overrides: List[str] = dataclasses.field(default_factory=list)
    sweep: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Grid:
    benchmark: str
    entries: List[GridEntry]
    orders: Optional[List[Any]] = None  # None: the benchmark's default order
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0])
    num_tasks: List[Optional[int]] = dataclasses.field(default_factory=lambda: [None])
    overrides: List[str] = dataclasses.field(default_factory=list)
    out: Path = Path("results/runs")
    markdown: Optional[Path] = None
    csv: Optional[Path] = None
    title: Optional[str] = None
    source: Optional[Path] = None
    ray: Dict[str, Any] = dataclasses.field(default_factory=lambda: dict(RAY_DEFAULTS))
    sweep: Dict[str, Any] = dataclasses.field(default_factory=dict)
    select: Optional[str] = None
    default_run_ids: set = dataclasses.field(default_factory=set)  # filled by ``expand``


def _sweep_table(value: Any, where: str) -> Dict[str, Any]:
    """{key: [values]} or {key: {"times_default": [factors]}}, checked."""
    example = 'e.g. [sweep] "merger.alpha" = [0.5, 1.0] or {times_default = [0.5, 1.0, 1.5]}'
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'sweep' must be a table, {example}")
    out = {}
    for key, axis in value.items():
        if "." not in key:
            raise UserError(f"{where}: sweep key '{key}' must be SECTION.NAME (learner., merger., benchmark., run.)")
        values = axis.get("times_default") if isinstance(axis, dict) else axis
        if isinstance(axis, dict) and set(axis) != {"times_default"}:
            raise UserError(f"{where}: sweep '{key}' takes a list of values or {{times_default = [...]}}")
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in values):
            raise UserError(f"{where}: sweep '{key}' needs a non-empty list of values, {example}")
        if isinstance(axis, dict) and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise UserError(f"{where}: sweep '{key}' times_default takes numbers")
        out[key] = {"times_default": list(values)} if isinstance(axis, dict) else list(values)
    return out


def _where(source: Optional[Path]) -> str:
    return f"grid {source}" if source else "grid"


def _str_list(value: Any, key: str, where: str) -> List[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: '{key}' must be a list of strings, e.g. {key} = [\"learner.lr=1e-4\"]")
    return list(value)


def _int_list(value: Any, key: str, where: str, allow_none: bool = False) -> List[Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: '{key}' must be a non-empty list of integers, e.g. {key} = [0, 1]")
    return list(value)


def _ray_table(value: Any, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'ray' must be a table ([ray] with num_cpus, num_gpus, max_retries)")
    bad = sorted(set(value) - set(RAY_DEFAULTS))
    if bad:
        raise UserError(f"{where}: [ray] has unknown key '{bad[0]}'; known: {', '.join(sorted(RAY_DEFAULTS))}")
    out = dict(RAY_DEFAULTS)
    for key, v in value.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if key == "max_retries" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise UserError(f"{where}: [ray] max_retries must be an integer >= 0, e.g. max_retries = 3; got {v!r}")
        if key == "num_cpus" and not (number and v > 0):
            raise UserError(f"{where}: [ray] num_cpus must be a number > 0, e.g. num_cpus = 1; got {v!r}")
        if key == "num_gpus" and not (number and v >= 0 and (v <= 1 or float(v).is_integer())):
            raise UserError(f"{where}: [ray] num_gpus must be a fraction in [0, 1] or a whole number, "
                            f"e.g. num_gpus = 0.5; got {v!r}")
        out[key] = v
    return out


def parse_grid(data: Dict[str, Any], base_dir: Path = Path("."), source: Optional[Path] = None) -> Grid:
    """A grid from an already-parsed mapping (paths resolved against ``base_dir``)."""
    where = _where(source)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(_TOP_KEYS))}")
    benchmark = data.get("benchmark")
    if not isinstance(benchmark, str) or not benchmark:
        raise UserError(f"{where}: set benchmark = \"NAME\" (see `cl-merge list`)")

    entries: List[GridEntry] = []
    strategies = data.get("strategies", [])
    if strategies == "all":
        from .registry import STRATEGIES

        strategies = STRATEGIES.names()
    for name in _str_list(strategies, "strategies", where):
        entries.append(GridEntry(strategy=name))
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise UserError(f"{where}: 'runs' must be a list of tables ([[runs]] sections)")
    for i, run in enumerate(runs, start=1):
        bad = sorted(set(run) - _RUN_KEYS)
        if bad:
            raise UserError(f"{where}: [[runs]] #{i} has unknown key '{bad[0]}'; known: {', '.join(sorted(_RUN_KEYS))}")
        for key in ("strategy", "learner", "merger", "protocol"):
            if key in run and not isinstance(run[key], str):
                raise UserError(f"{where}: [[runs]] #{i}: '{key}' must be a string")
        if not run.get("strategy") and not (run.get("learner") and run.get("merger")):
            raise UserError(f"{where}: [[runs]] #{i} needs strategy = \"NAME\" or both learner and merger")
        entries.append(GridEntry(strategy=run.get("strategy"), learner=run.get("learner"),
                                 merger=run.get("merger"), protocol=run.get("protocol"),
                                 overrides=_str_list(run.get("overrides", []), "overrides", f"{where} [[runs]] #{i}"),
                                 sweep=_sweep_table(run.get("sweep", {}), f"{where} [[runs]] #{i}")))
    if not entries:
        raise UserError(f"{where}: no runs; set strategies = [\"c-ta\", ...] or \"all\", or add [[runs]] sections")

    orders = data.get("orders")
    if orders == "all":
        from .registry import BENCHMARKS

        try:
            orders = BENCHMARKS.get(benchmark)().orders()
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    elif orders is not None:
        if not isinstance(orders, list):
            orders = [orders]
        if not orders or not all(isinstance(o, (int, str)) and not isinstance(o, bool) for o in orders):
            raise UserError(f"{where}: 'orders' must be \"all\" or a non-empty list of order ids, e.g. [1, 2, 3]")
    seeds = _int_list(data.get("seeds", [0]), "seeds", where)
    num_tasks: List[Optional[int]] = [None]
    if "num_tasks" in data:
        num_tasks = _int_list(data["num_tasks"], "num_tasks", where)

    def path(key: str, default: Optional[str]) -> Optional[Path]:
        value = data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise UserError(f"{where}: '{key}' must be a path string")
        p = Path(value)
        return p if p.is_absolute() else base_dir / p

    title = data.get("title")
    if title is not None and not isinstance(title, str):
        raise UserError(f"{where}: 'title' must be a string")
    select = data.get("select")
    if select is not None and select not in SELECTIONS:
        raise UserError(f"{where}: select must be one of {', '.join(SELECTIONS)}; got {select!r}")
    return Grid(benchmark=benchmark, entries=entries, orders=orders, seeds=seeds, num_tasks=num_tasks,
                overrides=_str_list(data.get("overrides", []), "overrides", where),
                out=path("out", "runs"), markdown=path("markdown", None), csv=path("csv", None),
                title=title, source=source, ray=_ray_table(data.get("ray", {}), where),
                sweep=_sweep_table(data.get("sweep", {}), where), select=select)


def load_grid(path: Path) -> Grid:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no such grid file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"grid file {path} is unreadable ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"grid file {path} is not valid TOML ({exc}); fix the syntax") from None
    return parse_grid(data, base_dir=path.resolve().parent, source=path)


def _current_value(config: RunConfig, key: str) -> Any:
    """The value ``key`` (SECTION.NAME) takes in ``config``; KeyError when no component declares it."""
    section, name = key.split(".", 1)
    params = {"learner": config.learner_params, "merger": config.merger_params,
              "benchmark": config.benchmark_params, "run": config.run_params}.get(section)
    if params is None or name not in params:
        raise KeyError(key)
    value = params[name]
    if value is None and section in ("learner", "merger"):  # a default the component fills in itself
        from .registry import LEARNERS, MERGERS

        cls = (MERGERS if section == "merger" else LEARNERS).get(getattr(config, section))
        value = getattr(cls(**params), name, None)
    return value


def _axes(config: RunConfig, sweep: Dict[str, Any], where: str) -> List[List[str]]:
    """The override strings of each sweep axis this config declares (absolute or times its default)."""
    axes = []
    for key, axis in sweep.items():
        try:
            current = _current_value(config, key)
        except KeyError:
            continue
        if isinstance(axis, dict):
            if not isinstance(current, (int, float)) or isinstance(current, bool):
                raise UserError(f"{where}: sweep '{key}' times_default needs a numeric default; "
                                f"{config.label} has {current!r}; give absolute values")
            values = [round(current * f, 12) for f in axis["times_default"]]
        else:
            values = axis
        axes.append([f"{key}={v}" for v in values])
    return axes


def expand(grid: Grid) -> List[RunConfig]:
    """Every run of the grid, resolved and checked (T × entry × sweep × order × seed), without
    duplicates. A swept entry also runs at its own defaults (``grid.default_run_ids``)."""
    import itertools

    where = _where(grid.source)
    configs: List[RunConfig] = []
    seen = set()
    grid.default_run_ids = set()
    used_keys = set()

    def add(config: RunConfig, default: bool) -> None:
        if default:
            grid.default_run_ids.add(config.run_id())
        if config.run_id() not in seen:
            seen.add(config.run_id())
            configs.append(config)

    for T in grid.num_tasks:
        for entry in grid.entries:
            sweep = {**grid.sweep, **entry.sweep}
            for order in (grid.orders or [None]):
                for seed in grid.seeds:
                    overrides = list(grid.overrides) + list(entry.overrides)
                    if T is not None:
                        overrides.append(f"benchmark.num_tasks={T}")

                    def build(extra):
                        try:
                            return resolve(grid.benchmark, strategy=entry.strategy, learner=entry.learner,
                                           merger=entry.merger, protocol=entry.protocol, order=order,
                                           seed=seed, overrides=overrides + list(extra))
                        except UserError as exc:
                            raise UserError(f"{where}: {exc}") from None

                    base = build([])
                    add(base, True)
                    axes = _axes(base, sweep, where)
                    used_keys |= {a[0].split("=", 1)[0] for a in axes}
                    for combo in itertools.product(*axes) if axes else ():
                        add(build(combo), False)
    unused = sorted(set(grid.sweep) - used_keys)
    if unused:
        raise UserError(f"{where}: no entry declares sweep key '{unused[0]}' (see `cl-merge list`)")
    return configs


# ---- selection on validation data --------------------------------------------------------------------
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
        variant = json.dumps(_variant(r), sort_keys=True, default=str)
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


def mark_tuned(rows: Sequence["Row"], choices: Sequence[Dict[str, Any]]) -> None:
    """Name each row's selected setting ("tuned on val: KEY=VALUE")."""
    by_key = {(c["benchmark"], c["model"], c["strategy"], c["protocol"], c["T"]): c for c in choices}
    for row in rows:
        c = by_key.get((row.benchmark, row.model, row.strategy, row.protocol, row.T))
        if c is not None and c["selected"]:
            row.variant = "tuned on val: " + ", ".join(f"{k}={v}" for k, v in c["selected"].items())


# ---- running ---------------------------------------------------------------------------------------
def run_grid(configs: Sequence[RunConfig], out_dir: Path, progress: bool = True, console=None) -> Dict[str, int]:
    """Execute every config whose result file is missing (resume=True); returns counts."""
    from .runner import drop_leftover_checkpoint, execute, result_path

    counts = {"finished_before": 0, "ran": 0}
    for i, config in enumerate(configs, start=1):
        path = result_path(config, out_dir)
        head = (f"[{i}/{len(configs)}] {config.label} ({config.protocol}) "
                f"T={config.benchmark_params.get('num_tasks') or 'all'} order {config.order} seed {config.seed}")
        if path.exists():
            load_result(path)  # a corrupt file stops here, named
            drop_leftover_checkpoint(config, out_dir)
            counts["finished_before"] += 1
            if console is not None:
                console.print(f"{head}: finished earlier, skipped", highlight=False)
            continue
        if console is not None:
            console.rule(head)
        t0 = time.perf_counter()
        result, _ = execute(config, out_dir=out_dir, resume=True, progress=progress)
        counts["ran"] += 1
        if console is not None:
            score = "diverged" if result.get("diverged") else f"ACC {100 * result['acc']:.1f}"
            console.print(f"{head}: {score} in {time.perf_counter() - t0:.1f} s", highlight=False)
    return counts


def collect(configs: Sequence[RunConfig], out_dir: Path) -> Tuple[List[Dict[str, Any]], List[RunConfig]]:
    """The grid's result files (loaded and validated) and the configs that have none yet."""
    from .runner import result_path

    results, missing = [], []
    for config in configs:
        path = result_path(config, out_dir)
        if path.exists():
            results.append(load_result(path))
        else:
            missing.append(config)
    return results, missing


# ---- aggregation --------------------------------------------------------------------------------------
def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """Mean and sample standard deviation (n − 1) of the non-null values, and their count."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return None, None, 0
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else None), len(kept)


def final_sar(result: Dict[str, Any]) -> Optional[float]:
    sar = result.get("sar") or []
    return sar[-1] if sar else None


def _variant(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in (result.get("hyperparameters") or {}).items() if k != "benchmark.num_tasks"}


def _order_key(order: Any):
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
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in results:
        key = (r["benchmark"], r.get("model"), r["strategy"], r["protocol"], len(r["tasks"]),
               json.dumps(_variant(r), sort_keys=True, default=str))
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
            mine = json.loads(variant_json)
            differing = sorted({k for v in variants for k in set(v) | set(mine) if v.get(k) != mine.get(k)})
            variant = ", ".join(f"{k}={mine.get(k)}" for k in differing)
        diverged = sum(1 for r in runs if r.get("diverged"))
        stats = {m: ((None, None, 0) if diverged else mean_std([f(r) for r in runs])) for m, f in METRICS.items()}
        per_order: Dict[Any, Dict[str, Optional[float]]] = {}
        for order in sorted({r["order"] for r in runs}, key=_order_key):
            of_order = [r for r in runs if r["order"] == order]
            bad = any(r.get("diverged") for r in of_order)
            per_order[order] = {m: None if bad else mean_std([METRICS[m](r) for r in of_order])[0]
                                for m in ("acc", "bwt", "sar", "normalized_acc")}
            per_order[order]["diverged"] = bad
        ranked = [o for o in per_order if per_order[o]["acc"] is not None]
        worst = min(ranked, key=lambda o: per_order[o]["acc"]) if ranked else None
        if len(ranked) > 1 and max(per_order[o]["acc"] for o in ranked) - per_order[worst]["acc"] < 1e-12:
            worst = None  # every order gives the same ACC (e.g. order-invariant merging): no worst order
        scopes = {r.get("sar_scope") for r in runs if final_sar(r) is not None}
        row = Row(benchmark=benchmark, model=model, strategy=strategy, variant=variant, protocol=protocol, T=T,
                  runs=sorted(runs, key=lambda r: (_order_key(r["order"]), r["seed"])), stats=stats,
                  per_order=per_order, worst_order=worst,
                  sar_scope=scopes.pop() if len(scopes) == 1 else ("mixed" if scopes else None), diverged=diverged)
        if reference is not None and not variant and all(r.get("registered_strategy", True) for r in runs):
            row.reference = match_reference(reference, model, strategy, T)
        rows.append(row)
    rows.sort(key=lambda r: (r.benchmark, str(r.model), r.T, r.stats["acc"][0] is None, -(r.stats["acc"][0] or 0.0),
                             r.name, r.protocol))
    return rows


# ---- the paper's Table 1 ----------------------------------------------------------------------------
def load_reference(path: Path = REFERENCE_TABLE) -> List[Dict[str, Any]]:
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    except OSError:
        raise UserError(f"reference table {path} is missing; pass --reference PATH to its CSV") from None
    out = []
    for rec in csv.DictReader(lines):
        try:
            out.append({"backbone": rec["backbone"], "tasks": int(rec["tasks"]), "method": rec["method"],
                        **{k: (float(rec[k]) if rec.get(k) not in (None, "") else None)
                           for k in ("acc_mean", "acc_std", "bwt_mean", "bwt_std")}})
        except (KeyError, ValueError) as exc:
            raise UserError(f"reference table {path} has a malformed row ({exc}); restore it from git") from None
    return out


def backbone_of(model: Optional[str]) -> Optional[str]:
    """'open_clip:ViT-B-32/openai' -> 'ViT-B/32'; HF 'clip-vit-base-patch32' -> 'ViT-B/32'."""
    if not model:
        return None
    m = re.search(r"ViT-([BLHg])-(\d+)", model, re.IGNORECASE)
    if m:
        return f"ViT-{m.group(1).upper()}/{m.group(2)}"
    m = re.search(r"vit-(base|large|huge)-patch(\d+)", model, re.IGNORECASE)
    if m:
        return f"ViT-{m.group(1)[0].upper()}/{m.group(2)}"
    return None


def match_reference(reference: List[Dict[str, Any]], model: Optional[str], strategy: str, T: int) -> Optional[Dict[str, Any]]:
    backbone = backbone_of(model)
    method = REFERENCE_ALIASES.get(strategy.lower(), strategy.lower())
    for rec in reference:
        if rec["backbone"] == backbone and rec["tasks"] == T and rec["method"] == method:
            return rec
    return None


def reference_notes(rows: Sequence[Row], reference: List[Dict[str, Any]]) -> List[str]:
    """Per (backbone, T): the paper's pre-trained / fine-tuned rows beside our zero-shot / expert means."""
    notes, done = [], set()
    for row in rows:
        backbone = backbone_of(row.model)
        key = (backbone, row.T)
        if backbone is None or key in done:
            continue
        done.add(key)
        pre = match_reference(reference, row.model, "pretrained", row.T)
        ft = match_reference(reference, row.model, "finetuned", row.T)
        same = [r for r in rows if backbone_of(r.model) == backbone and r.T == row.T]
        zs = mean_std([r.stats["zero_shot"][0] for r in same])[0]
        ex = mean_std([r.stats["expert"][0] for r in same])[0]
        if pre or ft:
            notes.append(f"{backbone}, T={row.T}: paper pre-trained {_ref(pre, 'acc')} / fine-tuned {_ref(ft, 'acc')}; "
                         f"ours zero-shot {_pct(zs)} / experts {_pct(ex)}")
    return notes


# ---- output -------------------------------------------------------------------------------------------
def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _pm(stat: Tuple[Optional[float], Optional[float], int], percent: bool = True) -> str:
    mean, std, _ = stat
    if mean is None:
        return "–"
    if percent:
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def _ref(rec: Optional[Dict[str, Any]], metric: str) -> str:
    if not rec or rec.get(f"{metric}_mean") is None:
        return "–"
    std = rec.get(f"{metric}_std")
    return f"{rec[f'{metric}_mean']:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def all_orders(rows: Sequence[Row]) -> List[Any]:
    return sorted({o for r in rows for o in r.per_order}, key=_order_key)


def with_reference(rows: Sequence[Row]) -> bool:
    return any(r.benchmark in REFERENCE_BENCHMARKS for r in rows)


def table_columns(rows: Sequence[Row]) -> List[str]:
    cols = ["strategy", "protocol", "T", "n", "ACC", "BWT", "SAR", "norm. ACC", "worst order (ACC)"]
    cols += [f"ACC o{o}" for o in all_orders(rows)]
    if with_reference(rows):
        cols += ["paper ACC", "paper BWT"]
    return cols


def table_cells(row: Row, orders: Sequence[Any], reference: bool) -> List[str]:
    if row.worst_order is not None:
        worst = f"{row.worst_order} ({_pct(row.per_order[row.worst_order]['acc'])})"
    else:
        worst = "all equal" if len(row.per_order) > 1 else "–"
    if row.diverged:  # never a number for a row with a diverged run
        mark = f"diverged ({row.diverged}/{row.n})"
        cells = [row.name, row.protocol, str(row.T), str(row.n), mark, mark, mark, mark, "–"]
    else:
        cells = [row.name, row.protocol, str(row.T), str(row.n), _pm(row.stats["acc"]), _pm(row.stats["bwt"]),
                 _pm(row.stats["sar"], percent=False), _pm(row.stats["normalized_acc"]), worst]
    cells += [(_order_cell(row.per_order[o])) if o in row.per_order else "" for o in orders]
    if reference:
        cells += [_ref(row.reference, "acc"), _ref(row.reference, "bwt")]
    return cells


def _order_cell(vals: Dict[str, Any]) -> str:
    return "diverged" if vals.get("diverged") else _pct(vals["acc"])


def title_of(rows: Sequence[Row], title: Optional[str] = None) -> str:
    benches = sorted({r.benchmark for r in rows})
    models = sorted({str(r.model) for r in rows if r.model})
    base = title or f"leaderboard: {', '.join(benches)}"
    return base + (f" ({', '.join(models)})" if models else "")


def rich_table(rows: Sequence[Row], title: Optional[str] = None):
    from rich.table import Table

    orders, ref = all_orders(rows), with_reference(rows)
    table = Table(title=f"{title_of(rows, title)} — mean ± sample std over orders; ACC/BWT in %, SAR in [0, 1]")
    for col in table_columns(rows):
        table.add_column(col, justify="left" if col in ("strategy", "protocol") else "right")
    for row in rows:
        table.add_row(*table_cells(row, orders, ref))
    return table


def footnotes(rows: Sequence[Row]) -> List[str]:
    scopes = sorted({r.sar_scope for r in rows if r.sar_scope})
    scope_text = {"seen_tasks": "mean over all tasks seen so far (run.sar_store=true)",
                  "current_task": "the last task's own update only (run.sar_store=false)",
                  "mixed": "mixed scopes within a row"}
    energy = sorted({str(run.get("sar_energy")) for r in rows for run in r.runs if run.get("sar_energy") is not None})
    notes = ["ACC, BWT (denominator T−1) and normalized ACC in %; mean ± sample standard deviation (n − 1) over "
             "the n runs of a row (task orders × seeds); per-order columns average over seeds.",
             "worst order: the order with the lowest ACC (\"all equal\" when every order gives the same ACC)."]
    if scopes:
        notes.append(f"SAR: subspace alignment ratio after the final step, per 2-D layer of the merged model at "
                     f"{'/'.join(energy) or '0.95'} retained energy, averaged over layers then tasks; "
                     + "; ".join(f"{s}: {scope_text.get(s, s)}" for s in scopes) + ".")
    else:
        notes.append("SAR: not recorded.")
    if with_reference(rows):
        notes.append("paper: SAIM paper Table 1 (mean ± std over its five task orders), same backbone and T.")
    return notes


def markdown(rows: Sequence[Row], title: Optional[str] = None,
             reference: Optional[List[Dict[str, Any]]] = None) -> str:
    orders, ref = all_orders(rows), with_reference(rows)
    cols = table_columns(rows)
    lines = [f"# {title_of(rows, title)}", "",
             "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if c in ("strategy", "protocol") else "---:" for c in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(table_cells(row, orders, ref)) + " |")
    lines.append("")
    lines += [f"- {n}" for n in footnotes(rows)]
    if ref and reference:
        lines += [f"- {n}" for n in reference_notes(rows, reference)]
    lines += ["", "## Per-order values", "",
              "| strategy | protocol | T | order | seeds | ACC | BWT | SAR | norm. ACC |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for order, vals in row.per_order.items():
            seeds = len([r for r in row.runs if r["order"] == order])
            if vals.get("diverged"):
                lines.append(f"| {row.name} | {row.protocol} | {row.T} | {order} | {seeds} | diverged | diverged | "
                             "diverged | diverged |")
                continue
            sar = "–" if vals["sar"] is None else f"{vals['sar']:.3f}"
            lines.append(f"| {row.name} | {row.protocol} | {row.T} | {order} | {seeds} | {_pct(vals['acc'])} | "
                         f"{_pct(vals['bwt'])} | {sar} | {_pct(vals['normalized_acc'])} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Row]) -> str:
    """One line per row; metrics as fractions in [0, 1] like the results JSON (paper columns too)."""
    orders = all_orders(rows)
    fields = ["benchmark", "model", "strategy", "variant", "protocol", "T", "n", "diverged", "orders", "sar_scope"]
    for m in ("acc", "bwt", "sar", "normalized_acc"):
        fields += [f"{m}_mean", f"{m}_std"]
    fields += ["worst_order", "worst_order_acc"]
    for m in ("acc", "bwt", "sar", "normalized_acc"):
        fields += [f"{m}_order_{o}" for o in orders]
    fields += ["paper_acc_mean", "paper_acc_std", "paper_bwt_mean", "paper_bwt_std"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        rec: Dict[str, Any] = {"benchmark": row.benchmark, "model": row.model, "strategy": row.strategy,
                               "variant": row.variant, "protocol": row.protocol, "T": row.T, "n": row.n,
                               "diverged": row.diverged, "orders": " ".join(map(str, row.per_order)), "sar_scope": row.sar_scope,
                               "worst_order": row.worst_order,
                               "worst_order_acc": row.per_order[row.worst_order]["acc"] if row.worst_order is not None else None}
        for m in ("acc", "bwt", "sar", "normalized_acc"):
            rec[f"{m}_mean"], rec[f"{m}_std"], _ = row.stats[m]
            for o in orders:
                vals = row.per_order.get(o, {})
                rec[f"{m}_order_{o}"] = "diverged" if vals.get("diverged") else vals.get(m)
        if row.reference:
            for k in ("acc_mean", "acc_std", "bwt_mean", "bwt_std"):
                v = row.reference.get(k)
                rec[f"paper_{k}"] = None if v is None else v / 100.0
        writer.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()})
    return buf.getvalue()
