"""The grid file: parsing and checking it (``load_grid``/``parse_grid``) and expanding it into
resolved runs (``expand``: T × entry × sweep × order × seed, every name and override checked before
anything runs). The file format is described in ``cl_merge.leaderboard`` and docs/.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import RunConfig, resolve
from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

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
        from ..registry import STRATEGIES

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
        from ..registry import BENCHMARKS

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
        from ..registry import LEARNERS, MERGERS

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


