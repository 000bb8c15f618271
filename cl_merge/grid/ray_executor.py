"""The Ray executor: a grid on Ray (``cl-merge leaderboard GRID --engine ray [--address ...]``).

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
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

from ..config import RunConfig
from ..errors import UserError
from .display import GridDisplay
from .outcome import GridOutcome
from .plan import plan_experts, shares_experts, task_names_of
from .ray_tasks import Attempts, run_one, stream_names, train_expert
from .spec import RAY_DEFAULTS


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


def error_line(exc: BaseException) -> str:
    """One line for a failed task: the run's own exception (type: message), or what Ray says about a
    dead worker/node."""
    ray = import_ray()
    cause, prefix = exc, ""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
        if "train_expert" in str(getattr(exc, "function_name", "")):
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
             around_run: Optional[Callable[[RunConfig], Optional[ContextManager]]] = None) -> GridOutcome:
    """Run every config whose result file is missing on Ray; returns what happened.

    ``around_run`` (picklable; it travels to the workers): called with each run's config on its worker,
    returns a context manager entered around the run, or None."""
    from ..results import ensure_results_dir, load_result
    from ..runner import result_path

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
        stream_task = ray.remote(stream_names).options(**opts)
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
        expert_task = ray.remote(train_expert).options(**opts)
        expert_refs = {key: expert_task.remote(job.config, job.task, str(out_dir), cwd, threads)
                       for key, job in jobs.items()}

        attempts = Attempts(out_dir)
        attempts.reset([c.run_id() for c in todo])
        run_task = ray.remote(run_one).options(**opts)
        pending = {}  # ObjectRef -> (config, run id)
        for config in todo:
            run_id = config.run_id()
            deps = [expert_refs[k] for k in needs.get(run_id, [])]
            pending[run_task.remote(config, str(out_dir), cwd, threads, around_run, *deps)] = (config, run_id)

        with GridDisplay(len(todo), len(jobs), progress, console) as display:
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
