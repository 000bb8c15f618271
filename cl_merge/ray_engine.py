"""Leaderboard grids on Ray (``cl-merge leaderboard GRID --engine ray [--address ...]``).

Ray (an optional extra: ``pip install -e ".[ray]"``) does the scheduling; this module only builds the
task graph and reads the outcome:

- every run of the grid is one Ray task that calls ``runner.execute(config, out, resume=True)`` with the
  grid's declared resources (``[ray] num_cpus / num_gpus``; fractional GPUs allowed). It writes the same
  result file, checkpoints and expert cache as the local runner, so ``report``, ``--report-only`` and
  resume work unchanged. ``out`` (and ``run.cache_dir``) must be storage every node sees.
- independent-protocol experts are planned before anything runs: one Ray task per distinct
  (θ0/benchmark settings, task, learner + config, seed, cache) trains the expert once into the expert
  cache, and every run that needs it takes that task's ObjectRef as an argument, so Ray starts the run
  only after its experts exist and the run's own protocol loop finds them in the cache. The plan only
  decides sharing: a run whose expert was not planned (or was planned under another key) still trains
  it itself, so results never depend on the plan.
- fault tolerance is Ray's: ``max_retries`` re-runs a task whose worker or node died (the rerun resumes
  from the run's last step checkpoint); exceptions raised by a run itself (bad config, NaN, ...) are not
  retried (``retry_exceptions=False``) and are reported once with their message. The grid always runs
  to the end and the report lists what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import RunConfig
from .errors import UserError


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install -e \".[ray]\" (or pip install ray)") from None
    return ray


def connect(address: Optional[str]) -> bool:
    """Join the cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), or start a local
    Ray instance when there is none (Ray's own rule: RAY_ADDRESS, else a new local instance). Returns
    whether this call started/joined it (then the caller shuts it down); an already initialised Ray in
    this process is reused as is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"cannot start or reach Ray at {where} ({first}); start one with `ray start --head` "
                        "and pass --address auto, or omit --address for a local instance") from None
    return True


# ---- planning shared experts ---------------------------------------------------------------------
def shares_experts(config: RunConfig) -> bool:
    """Whether the run's experts come from the expert cache (the protocol's own rule)."""
    from .registry import BENCHMARKS, LEARNERS

    from .expert_provider import shares_experts as rule

    return rule(config.protocol, LEARNERS.get(config.learner), BENCHMARKS.get(config.benchmark).parameter_store,
                config.run_params.get("expert_cache", True))


def cache_dir_of(config: RunConfig, out_dir: Path) -> str:
    return str(config.run_params.get("cache_dir") or Path(out_dir) / ".cache")


def expert_plan_key(config: RunConfig, task_name: str, out_dir: Path) -> str:
    """Everything the expert cache key depends on, known before anything is built: the benchmark and
    its settings except the stream length (θ0 and the task's data), the task, the learner and its
    config, the run seed (the fit seed of an independent expert is (seed, task name)), and the cache."""
    bench = {k: v for k, v in config.benchmark_params.items() if k != "num_tasks"}
    return json.dumps([config.benchmark, bench, task_name, config.learner, config.learner_params,
                       config.seed, cache_dir_of(config, out_dir)], sort_keys=True, default=str)


def task_names_of(config: RunConfig) -> Optional[List[str]]:
    from .registry import BENCHMARKS

    return BENCHMARKS.get(config.benchmark)(**config.benchmark_params).task_names(config.order)


@dataclasses.dataclass
class ExpertJob:
    key: str
    config: RunConfig  # a run whose stream holds the task (its stream is built to find the task)
    task: str
    users: int = 0  # run steps that read this expert


def plan_experts(configs: Sequence[RunConfig], out_dir: Path,
                 names: Dict[str, Optional[List[str]]]) -> Tuple[Dict[str, ExpertJob], Dict[str, List[str]]]:
    """Distinct experts and, per run id, the plan keys its steps read."""
    jobs: Dict[str, ExpertJob] = {}
    needs: Dict[str, List[str]] = {}
    for config in configs:
        if not shares_experts(config) or not names.get(config.run_id()):
            continue
        keys = []
        for task in names[config.run_id()]:
            key = expert_plan_key(config, task, out_dir)
            job = jobs.setdefault(key, ExpertJob(key=key, config=config, task=task))
            job.users += 1
            if key not in keys:
                keys.append(key)
        needs[config.run_id()] = keys
    return jobs, needs


# ---- the Ray tasks (plain functions; wrapped with ray.remote at run time, Ray being optional) -------
def _enter(cwd: Optional[str], threads: int) -> None:
    """Same working directory as the driver where it exists (relative run.cache_dir means the same),
    and torch's intra-op threads = the run's CPUs unless run.threads says otherwise."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    import torch

    torch.set_num_threads(max(1, threads))


def _stream_names(config: RunConfig, cwd: Optional[str], threads: int) -> List[str]:
    """Task names of a benchmark that cannot name them without building its stream."""
    _enter(cwd, threads)
    from .config import instantiate

    benchmark = instantiate(config)[0]
    return [t.name for t in benchmark.build_stream(order=config.order, seed=config.seed).tasks]


def _train_expert(config: RunConfig, task_name: str, out_dir: str, cwd: Optional[str],
                  threads: int) -> Dict[str, Any]:
    """Train one independent expert into the expert cache exactly as ``run_protocol`` would (same start,
    fit seed and context), unless the cache already holds it."""
    _enter(cwd, threads)
    import cl_merge  # noqa: F401  (torchvision shim before open_clip)
    from .config import instantiate
    from .expert_cache import ExpertCache, layout_of
    from .expert_provider import ExpertProvider
    from .runner import resolve_device

    t0 = time.perf_counter()
    benchmark, learner, _merger, settings = instantiate(config)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    cache_dir = Path(cache_dir_of(config, Path(out_dir)))
    adapter = benchmark.build_model(cache_dir=cache_dir, device=device, eval_batch_size=settings.eval_batch_size)
    tasks = benchmark.build_stream(order=config.order, seed=config.seed).tasks
    for task in tasks:  # as run_protocol does before it reads θ0
        adapter.prepare(task)
    position = [t.name for t in tasks].index(task_name) + 1
    task = tasks[position - 1]
    theta0 = adapter.get_state()
    cache = ExpertCache(cache_dir / "experts", expected=layout_of(theta0))
    provider = ExpertProvider(adapter, learner, config.learner, "independent", config.seed, cache)
    try:  # the cache holds the entry's lock from get until put: trained once across processes
        _, source = provider.get(task, position, theta0)
    finally:
        cache.release()
    return {"task": task_name, "learner": config.learner, "cache_key": provider.cache_key(task, position),
            "trained": source != "cache", "seconds": time.perf_counter() - t0}


@contextlib.contextmanager
def _die_after_step(step: int, marker: str):
    """Fault injection for tests: the process exits hard (as if killed) right after the checkpoint of
    ``step`` is written, once (``marker`` records that it happened)."""
    from . import runner

    base = runner.Checkpointer

    class Dying(base):
        def save(self, t, record, tensors):
            super().save(t, record, tensors)
            if t == step and not os.path.exists(marker):
                Path(marker).write_text(f"killed after step {t}\n")
                os._exit(1)

    runner.Checkpointer = Dying
    try:
        yield
    finally:
        runner.Checkpointer = base


def _run(config: RunConfig, out_dir: str, cwd: Optional[str], threads: int,
         kill_after: Optional[Tuple[int, str]], *experts: Dict[str, Any]) -> Dict[str, Any]:
    """One run of the grid. ``experts`` are the results of the expert tasks it depends on: Ray starts
    this task only once they are done (their experts are then in the cache)."""
    _enter(cwd, threads)
    import cl_merge  # noqa: F401
    from .checkpoint import Checkpointer
    from .runner import execute

    out = Path(out_dir)
    run_id = config.run_id()
    _Attempts(out).start(run_id)
    checkpoint = Checkpointer(out / f"{run_id}.ckpt", config.fingerprint())
    resumed_from = None
    if checkpoint.exists():
        try:
            resumed_from = int(json.loads(checkpoint.state_path.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            resumed_from = None  # execute names a corrupt checkpoint
    t0 = time.perf_counter()
    with (_die_after_step(*kill_after) if kill_after else contextlib.nullcontext()):
        result, path = execute(config, out_dir=out, resume=True, progress=False)
    return {"run_id": run_id, "acc": result["acc"], "path": str(path), "resumed_from": resumed_from,
            "expert_source": result.get("expert_source"), "seconds": time.perf_counter() - t0}


class _Attempts:
    """Which runs have started, and how often (one line per attempt in ``<out>/.ray/attempts/<run id>``,
    on the storage the results go to): the driver's 'running' count and its retry record."""

    def __init__(self, out_dir: Path):
        self.directory = Path(out_dir) / ".ray" / "attempts"

    def start(self, run_id: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / run_id, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.3f} pid {os.getpid()}\n")

    def reset(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            (self.directory / run_id).unlink(missing_ok=True)

    def started(self) -> set:
        try:
            return set(os.listdir(self.directory))
        except OSError:
            return set()

    def count(self, run_id: str) -> int:
        try:
            return len((self.directory / run_id).read_text().splitlines())
        except OSError:
            return 0


# ---- the driver ------------------------------------------------------------------------------------
@dataclasses.dataclass
class GridOutcome:
    ran: int = 0
    finished_before: int = 0
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)  # run id -> one-line error
    attempts: Dict[str, int] = dataclasses.field(default_factory=dict)  # run id -> times started
    resumed: Dict[str, int] = dataclasses.field(default_factory=dict)  # run id -> checkpoint step resumed from
    experts_planned: int = 0  # distinct experts of the grid's missing runs
    expert_uses: int = 0  # run steps that read a planned expert (= trainings without sharing)
    experts_trained: int = 0  # trained now by the expert tasks
    experts_cached: int = 0  # already in the cache
    experts_failed: Dict[str, str] = dataclasses.field(default_factory=dict)
    trained_in_runs: int = 0  # experts a run trained itself (unplanned), from the result files
    wall_s: float = 0.0

    @property
    def counts(self) -> Dict[str, int]:
        return {"ran": self.ran, "finished_before": self.finished_before, "failed": len(self.failed)}


def error_line(exc: BaseException) -> str:
    """One line for a failed task: the run's own exception (type: message), or what Ray says about a
    dead worker/node."""
    ray = import_ray()
    cause, prefix = exc, ""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
        if "_train_expert" in str(getattr(exc, "function_name", "")):
            prefix = "its shared expert failed: "
    if isinstance(cause, UserError):
        text = str(cause)
    elif isinstance(cause, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        text = f"its worker died on every attempt ({cause.__class__.__name__})"
    else:
        message = str(cause).strip().splitlines()
        text = f"{cause.__class__.__name__}: {message[-1] if message else ''}".rstrip(": ")
    return prefix + " ".join(text.split())


def check_resources(configs: Sequence[RunConfig], resources: Dict[str, Any], where: str) -> None:
    gpus = float(resources.get("num_gpus", 0) or 0)
    for config in configs:
        device = str(config.run_params.get("device", "cpu"))
        if gpus > 0 and device == "cpu":
            raise UserError(f"{where}: [ray] num_gpus = {resources['num_gpus']} but the runs use run.device=cpu; "
                            "add \"run.device=cuda\" (or auto) to the grid's overrides")
        if gpus == 0 and device.startswith("cuda"):
            raise UserError(f"{where}: runs use run.device={device} but [ray] declares no GPU; "
                            "set num_gpus (e.g. num_gpus = 0.5) in the grid's [ray] table")


def run_grid(configs: Sequence[RunConfig], out_dir: Path, resources: Optional[Dict[str, Any]] = None,
             address: Optional[str] = None, progress: bool = True, console=None, where: str = "grid",
             _kill_after: Optional[Dict[str, Tuple[int, str]]] = None) -> GridOutcome:
    """Run every config whose result file is missing on Ray; returns what happened.

    ``_kill_after`` (tests only): run id -> (step, marker file): that run's process exits hard after
    writing the checkpoint of that step, once."""
    from .leaderboard import RAY_DEFAULTS
    from .results import ensure_results_dir, load_result
    from .runner import result_path

    resources = dict(RAY_DEFAULTS, **(resources or {}))
    out_dir = Path(out_dir).resolve()
    check_resources(configs, resources, where)
    ensure_results_dir(out_dir)  # before the expert tasks write its .cache
    outcome = GridOutcome()
    todo = []
    for config in configs:
        path = result_path(config, out_dir)
        if path.exists():
            load_result(path)  # a corrupt file stops here, named
            outcome.finished_before += 1
        else:
            todo.append(config)
    if not todo:
        return outcome

    names: Dict[str, Optional[List[str]]] = {}
    for config in todo:
        if shares_experts(config):
            try:
                names[config.run_id()] = task_names_of(config)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None

    ray = import_ray()
    started_here = connect(address)
    t_start = time.perf_counter()
    stop_on_term = _TermAsInterrupt() if started_here else contextlib.nullcontext()
    try:
        stop_on_term.__enter__()
        cwd = os.getcwd()
        threads = max(1, int(resources["num_cpus"]))
        opts = {"num_cpus": resources["num_cpus"], "num_gpus": resources["num_gpus"],
                "max_retries": int(resources["max_retries"]), "retry_exceptions": False}
        stream_task = ray.remote(_stream_names).options(**opts)
        unknown = [c for c in todo if c.run_id() in names and names[c.run_id()] is None]
        if unknown:  # benchmarks without task_names(): build those streams on the cluster, once per stream
            refs: Dict[str, Any] = {}
            streams = {c.run_id(): json.dumps([c.benchmark, c.benchmark_params, c.order, c.seed], sort_keys=True,
                                              default=str) for c in unknown}
            for c in unknown:
                if streams[c.run_id()] not in refs:
                    refs[streams[c.run_id()]] = stream_task.remote(c, cwd, threads)
            for c in unknown:
                try:
                    names[c.run_id()] = ray.get(refs[streams[c.run_id()]])
                except ray.exceptions.RayError:
                    names[c.run_id()] = None  # its run reports the error; no sharing planned for it

        jobs, needs = plan_experts(todo, out_dir, names)
        outcome.experts_planned = len(jobs)
        outcome.expert_uses = sum(j.users for j in jobs.values())
        expert_task = ray.remote(_train_expert).options(**opts)
        expert_refs = {key: expert_task.remote(job.config, job.task, str(out_dir), cwd, threads)
                       for key, job in jobs.items()}

        attempts = _Attempts(out_dir)
        attempts.reset([c.run_id() for c in todo])
        run_task = ray.remote(_run).options(**opts)
        pending = {}  # ObjectRef -> (config, run id)
        for config in todo:
            run_id = config.run_id()
            deps = [expert_refs[k] for k in needs.get(run_id, [])]
            kill = (_kill_after or {}).get(run_id)
            pending[run_task.remote(config, str(out_dir), cwd, threads, kill, *deps)] = (config, run_id)

        with _GridDisplay(len(todo), len(jobs), progress, console) as display:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    config, run_id = pending.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        outcome.failed[run_id] = error_line(exc)
                        display.line(f"[red]failed[/] {run_id}: {outcome.failed[run_id]}")
                        continue
                    outcome.ran += 1
                    if info.get("resumed_from") is not None:
                        outcome.resumed[run_id] = info["resumed_from"]
                    outcome.trained_in_runs += sum(1 for s in info.get("expert_source") or []
                                                   if s == "trained" and shares_experts(config))
                    resumed = (f", resumed from step {info['resumed_from']}" if info.get("resumed_from") is not None
                               else "")
                    score = "diverged" if info["acc"] is None else f"ACC {100 * info['acc']:.1f}"
                    display.line(f"[green]done[/] {run_id}: {score} in "
                                 f"{info['seconds']:.1f} s{resumed}")
                experts_done = len(ray.wait(list(expert_refs.values()), num_returns=len(expert_refs),
                                            timeout=0)[0]) if expert_refs else 0
                finished = outcome.ran + len(outcome.failed)
                started = attempts.started()
                running = sum(1 for _, run_id in pending.values() if run_id in started)
                display.update(finished, running=running, failed=len(outcome.failed), experts_done=experts_done)
            outcome.attempts = {c.run_id(): attempts.count(c.run_id()) for c in todo}

        for key, ref in expert_refs.items():
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as exc:
                outcome.experts_failed[key] = error_line(exc)
                continue
            if info["trained"]:
                outcome.experts_trained += 1
            else:
                outcome.experts_cached += 1
    finally:
        outcome.wall_s = time.perf_counter() - t_start
        if started_here:  # a local instance we started (its raylets, dashboard and agents) goes with us
            ray.shutdown()
        stop_on_term.__exit__(None, None, None)
    return outcome


class _TermAsInterrupt:
    """While a Ray instance started by cl_merge is up, SIGTERM is handled like Ctrl-C (KeyboardInterrupt),
    so ``run_grid``'s cleanup shuts the instance down instead of leaving its processes running."""

    def __enter__(self):
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False


class _GridDisplay:
    """Live grid progress on stderr (rich): runs done / running / failed, experts, elapsed, ETA.
    Without a display (``--quiet``), one line per finished run."""

    def __init__(self, total: int, experts: int, enabled: bool, console):
        self.total, self.experts, self.console = total, experts, console
        self._progress = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            from .progress import console as stderr

            self._progress = Progress(TextColumn("[bold]grid on Ray"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), console=stderr)
            self._task = self._progress.add_task("grid", total=total, info=self._info(0, 0, 0, 0))

    def _info(self, done: int, running: int, failed: int, experts_done: int) -> str:
        text = f"done {done - failed} · running {running} · failed {failed}"
        return text + (f" · experts {experts_done}/{self.experts}" if self.experts else "")

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def update(self, finished: int, running: int, failed: int, experts_done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=finished,
                                  info=self._info(finished, running, failed, experts_done))

    def line(self, text: str) -> None:
        target = self._progress.console if self._progress is not None else self.console
        if target is not None:
            target.print(text, highlight=False)
