"""Resolve a run's configuration: strategy defaults, benchmark training budget, ``key=value``
overrides, all checked against the components' declared hyperparameters."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Literal, Optional, Sequence

from .components import Component, OpenUnitInterval, PositiveInt
from .errors import UserError
from .registry import BENCHMARKS, LEARNERS, MERGERS, PROTOCOLS, STRATEGIES

SECTIONS = ("learner", "merger", "benchmark", "run")


@dataclasses.dataclass
class RunSettings(Component):
    """How a run executes (``run.KEY=VALUE``)."""

    name = "run"
    eval_unseen: bool = True  # evaluate not-yet-seen tasks too (needed for FWT)
    device: str = "cpu"  # cpu | cuda | auto
    eval_batch_size: PositiveInt = 256  # examples per evaluation batch
    threads: Optional[PositiveInt] = None  # torch intra-op threads; None = torch's default
    expert_cache: bool = True  # reuse independent-protocol experts across strategies
    cache_dir: Optional[str] = None  # default: <out>/.cache
    sar: bool = True  # record the subspace alignment ratio per step (one SVD per 2-D layer per step)
    # the paper's SAR scope (Fig. 6): every seen task's update is kept on disk (bf16, inside the run's
    # checkpoint) and SAR averages over all of them; false scores the current task only (no store)
    sar_store: bool = True
    sar_energy: OpenUnitInterval = 0.95  # retained energy that picks the merged update's rank k
    sar_qkv: Literal["split", "stacked"] = "split"  # open_clip's in_proj_weight: three d × d layers, or one
    # a non-finite loss, gradient norm or weight: stop (exit 3, no results file) or record the run as diverged
    on_divergence: Literal["stop", "record"] = "stop"
    # experiment tracking (cl_merge.tracking): any of tensorboard,wandb,mlflow, comma-separated; none by default
    log: Optional[str] = None
    log_dir: Optional[str] = None  # default: <out>/.tracking
    log_project: str = "cl_merge"  # the wandb project and MLflow experiment

    def __post_init__(self):
        if not 0.0 < self.sar_energy <= 1.0:
            raise ValueError(f"run.sar_energy must be in (0, 1], e.g. 0.95; got {self.sar_energy}")
        if self.log is not None:  # an unknown tracker name fails before anything runs
            from .tracking import parse_log

            parse_log(self.log)


# settings that change speed or storage but never a result (left out of the run fingerprint)
# where files go, not what a run is: left out of the results file too (the same run, wherever its cache
# lives and whatever tracks it)
STORAGE_SETTINGS = ("cache_dir", "log", "log_dir", "log_project")
_NON_RESULT_SETTINGS = {"device", "eval_batch_size", "threads", "expert_cache", "on_divergence", *STORAGE_SETTINGS}


@dataclasses.dataclass
class RunConfig:
    benchmark: str
    strategy: Optional[str]
    learner: str
    merger: str
    protocol: str
    order: Any
    seed: int
    learner_params: Dict[str, Any]
    merger_params: Dict[str, Any]
    benchmark_params: Dict[str, Any]
    run_params: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        d = self.to_dict()
        d["run_params"] = {k: v for k, v in self.run_params.items() if k not in _NON_RESULT_SETTINGS}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def label(self) -> str:
        return self.strategy or f"{self.learner}+{self.merger}"

    def run_id(self) -> str:
        return (f"{self.benchmark}_{self.label}_{self.protocol}_order{self.order}_seed{self.seed}_"
                f"{self.fingerprint()[:8]}").replace("/", "-").replace(":", "-")

    def hyperparameters(self) -> Dict[str, Any]:
        out = {f"learner.{k}": v for k, v in self.learner_params.items()}
        out.update({f"merger.{k}": v for k, v in self.merger_params.items()})
        out.update({f"benchmark.{k}": v for k, v in self.benchmark_params.items()})
        return out


def parse_overrides(items: Sequence[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not of the form key=value (e.g. learner.lr=1e-4)")
        out[key.strip()] = value.strip()
    return out


def _qualify(key: str, fields: Dict[str, Dict[str, Any]]) -> str:
    section, dot, name = key.partition(".")
    if dot and section in SECTIONS:
        if name not in fields[section]:
            known = ", ".join(sorted(fields[section])) or "none"
            raise UserError(f"unknown key '{key}': {section} has {known}")
        return key
    owners = [s for s in SECTIONS if key in fields[s]]
    if not owners:
        known = ", ".join(f"{s}.{k}" for s in SECTIONS for k in sorted(fields[s]))
        raise UserError(f"unknown key '{key}'; known keys: {known}")
    if len(owners) > 1:
        options = " or ".join(f"{s}.{key}" for s in owners)
        raise UserError(f"key '{key}' is ambiguous; write {options}")
    return f"{owners[0]}.{key}"


def resolve(benchmark: str, strategy: Optional[str] = None, learner: Optional[str] = None,
            merger: Optional[str] = None, protocol: Optional[str] = None, order: Any = None,
            seed: int = 0, overrides: Optional[Sequence[str]] = None) -> RunConfig:
    bench_cls = BENCHMARKS.get(benchmark)
    strat = None
    if strategy is not None:
        if learner or merger:
            raise UserError("give either --strategy or --learner with --merger, not both")
        strat = STRATEGIES.get(strategy)
        learner, merger = strat.learner, strat.merger
        protocol = protocol or strat.protocol
    elif not (learner and merger):
        raise UserError("name a strategy (--strategy NAME) or both --learner NAME and --merger NAME")
    learner_cls, merger_cls = LEARNERS.get(learner), MERGERS.get(merger)
    protocol = protocol or default_protocol(merger, merger_cls)
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    check_protocol(merger, merger_cls, protocol)

    classes = {"learner": learner_cls, "merger": merger_cls, "benchmark": bench_cls, "run": RunSettings}
    fields = {s: c.hyperparameters() for s, c in classes.items()}
    layers: Dict[str, Dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in bench_cls.train_defaults.items():  # the benchmark's training budget
        if key in fields["learner"]:
            layers["learner"][key] = value
    for key, value in (strat.hyperparameters if strat else {}).items():
        section, _, name = _qualify(key, fields).partition(".")
        layers[section][name] = value
    for key, value in parse_overrides(overrides or []).items():
        section, _, name = _qualify(key, fields).partition(".")
        layers[section][name] = value

    built = {s: classes[s].build(layers[s], where=s) for s in SECTIONS}
    bench = built["benchmark"]
    if order is None:
        order = bench_cls.default_order
    order = resolve_order(bench, benchmark, order)
    return RunConfig(
        benchmark=benchmark, strategy=strategy, learner=learner, merger=merger, protocol=protocol,
        order=order, seed=int(seed),
        learner_params=built["learner"].config(), merger_params=built["merger"].config(),
        benchmark_params=built["benchmark"].config(), run_params=built["run"].config(),
    )


def supported_protocols(merger_cls) -> tuple:
    """The protocols a merger declares (``Merger.protocols`` / ``MultiTaskMerger.protocols``)."""
    return tuple(getattr(merger_cls, "protocols", ("sequential", "independent")))


def default_protocol(merger: str, merger_cls) -> str:
    if merger == "identity":
        return "sequential"
    supported = supported_protocols(merger_cls)
    return "independent" if "independent" in supported else supported[0]


def check_protocol(merger: str, merger_cls, protocol: str) -> None:
    """One line, before anything is created, when the merger does not support the protocol."""
    supported = supported_protocols(merger_cls)
    if protocol not in supported:
        raise UserError(f"merger {merger} does not support the {protocol} protocol; it supports "
                        f"{', '.join(supported)} (use --protocol {supported[0]})")


def resolve_order(bench, benchmark: str, order: Any) -> Any:
    """A benchmark may accept generated orders (e.g. vision20's ``seed:N``) through ``resolve_order``;
    otherwise the order must be one of ``orders()``."""
    if hasattr(bench, "resolve_order"):
        return bench.resolve_order(order)
    known_orders = bench.orders()
    matched = [o for o in known_orders if str(o) == str(order)]
    if not matched:
        raise UserError(f"unknown order '{order}' for benchmark {benchmark}; known: "
                        f"{', '.join(map(str, known_orders))}")
    return matched[0]


def instantiate(config: RunConfig):
    """(benchmark, learner, merger, settings) objects for a resolved config."""
    return (BENCHMARKS.get(config.benchmark)(**config.benchmark_params),
            LEARNERS.get(config.learner)(**config.learner_params),
            MERGERS.get(config.merger)(**config.merger_params),
            RunSettings(**config.run_params))


def list_hyperparameters(cls) -> List[str]:
    defaults = cls.defaults()
    return [f"{k}={defaults.get(k)!r}" for k in cls.hyperparameters()]
