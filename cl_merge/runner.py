"""Run one resolved configuration end to end and write its results JSON."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from filelock import FileLock, Timeout

import torch

from . import metrics
from .step_checkpoint import Checkpointer
from .config import STORAGE_SETTINGS, RunConfig, instantiate
from .divergence import Diverged
from .errors import UserError
from .expert_cache import ExpertCache, layout_of
from .io import sweep_temps, warn, write_json_atomic
from .progress import Reporter
from .protocol import run_protocol
from .results import SCHEMA_VERSION, check_results_dir, ensure_results_dir, environment, git_commit, load_result, peak_memory_bytes
from .normalization import INDEPENDENT_EXPERTS, normalized
from .provenance import command_line, created, rerun_command, weight_sha256
from .sar import SARMeter

DEFAULT_OUT = Path("results/runs")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
    return name


def result_path(config: RunConfig, out_dir: Path) -> Path:
    return Path(out_dir) / f"{config.run_id()}.json"


def execute(config: RunConfig, out_dir: Path = DEFAULT_OUT, resume: bool = False,
            progress: bool = True) -> Tuple[Dict[str, Any], Path]:
    out_dir = Path(out_dir)
    path = result_path(config, out_dir)
    if resume and path.exists():
        result = load_result(path)
        drop_leftover_checkpoint(config, out_dir)
        return result, path

    # every check before anything is created: settings, device, stream, where files go
    benchmark, learner, merger, settings = instantiate(config)
    device = resolve_device(settings.device)
    benchmark.task_names(config.order)  # stream length and order (benchmarks without it: build_stream)
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else out_dir / ".cache"
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"run.cache_dir {cache_dir} is a file, not a directory; choose a directory")
    check_results_dir(out_dir)
    created = not out_dir.exists()
    try:
        ensure_results_dir(out_dir)
        for directory in (out_dir, cache_dir / "experts", cache_dir / "heads"):
            sweep_temps(directory)  # what killed processes left behind
        with run_lock(out_dir, config.run_id()) as waited:
            if (waited or resume) and path.exists():  # another process ran it meanwhile: never run twice
                drop_leftover_checkpoint(config, out_dir)
                return load_result(path), path

            return _run(config, out_dir, path, resume, progress, benchmark, learner, merger, settings, device,
                        cache_dir)
    except Exception:
        # a run that fails before its first checkpoint, in a directory it created, leaves nothing behind
        if created and not (out_dir / f"{config.run_id()}.ckpt" / "state.json").exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def drop_leftover_checkpoint(config: RunConfig, out_dir: Path) -> None:
    """A checkpoint beside a finished result is spent (e.g. the process died between the two writes)."""
    leftover = Path(out_dir) / f"{config.run_id()}.ckpt"
    if leftover.is_dir():
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def run_lock(out_dir: Path, run_id: str):
    """Hold ``<out>/.<run id>.lock`` while the run executes; yields whether another process held it first
    (then this one waited for it to finish)."""
    lock = FileLock(str(Path(out_dir) / f".{run_id}.lock"))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        warn(f"run {run_id} is being run by another process; waiting for it")
        lock.acquire()
        waited = True
    try:
        yield waited
    finally:
        lock.release()


def _run(config, out_dir, path, resume, progress, benchmark, learner, merger, settings, device,
         cache_dir) -> Tuple[Dict[str, Any], Path]:
    tracker = None
    if settings.log:  # run.log=tensorboard,wandb,mlflow (cl_merge.tracking; imported only when named)
        from .tracking import open_trackers

        tracker = open_trackers(config, settings, out_dir)
    try:
        result, path = _run_steps(config, out_dir, path, resume, progress, benchmark, learner, merger, settings,
                                  device, cache_dir, tracker)
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is not None:
        tracker.close(failed=bool(result.get("diverged")))
    return result, path


def _run_steps(config, out_dir, path, resume, progress, benchmark, learner, merger, settings, device,
               cache_dir, tracker) -> Tuple[Dict[str, Any], Path]:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    t_start = time.perf_counter()
    checkpointer = Checkpointer(out_dir / f"{config.run_id()}.ckpt", config.fingerprint())
    cache = None
    try:
        with Reporter(enabled=progress) as reporter:
            t0 = time.perf_counter()
            adapter = benchmark.build_model(cache_dir=cache_dir, device=device,
                                            eval_batch_size=settings.eval_batch_size)
            stream = benchmark.build_stream(order=config.order, seed=config.seed)
            setup_s = time.perf_counter() - t0
            cache = (ExpertCache(cache_dir / "experts", expected=layout_of(adapter.get_state()))
                     if settings.expert_cache else None)
            # past tasks' updates for SAR live in the checkpoint directory: kept for resume, removed with it
            sar = (SARMeter(settings.sar_energy, checkpointer.directory / "sar" if settings.sar_store else None,
                            qkv=settings.sar_qkv) if settings.sar else None)
            # the benchmark picks the parameter store: in memory, or tensor by tensor on disk (mergebench)
            storage = benchmark.parameter_storage(adapter=adapter, checkpointer=checkpointer, device=device)
            if tracker is not None:
                tracker.start(stream.names)
            record = run_protocol(stream=stream, adapter=adapter, learner=learner, learner_name=config.learner,
                                  merger=merger, protocol=config.protocol, seed=config.seed,
                                  eval_unseen=settings.eval_unseen, checkpointer=checkpointer, resume=resume,
                                  cache=cache, reporter=reporter, sar=sar, storage=storage, tracker=tracker)
            benchmark.finish_run(stream, record)
            record["val_acc"] = final_validation(adapter, stream.tasks)
            record["weight_sha256"] = weight_sha256(record["deployed"])
            if config.protocol not in INDEPENDENT_EXPERTS and cache is not None and storage.kind == "memory":
                record["independent_expert_acc"] = cached_independent_experts(
                    adapter, learner, config, cache, stream.tasks)
    except Diverged as exc:
        if settings.on_divergence != "record":
            raise  # the last good checkpoint stays; no results file
        record = diverged_record(checkpointer)
        result = assemble(config, stream.names, adapter.model_id, record, device, setup_s=setup_s,
                          wall_s=time.perf_counter() - t_start, diverged=exc)
        write_json_atomic(path, result)
        checkpointer.clear()
        if tracker is not None:
            tracker.after_run(result, path)
        return result, path
    finally:
        if cache is not None:
            cache.release()
    result = assemble(config, stream.names, adapter.model_id, record, device,
                      setup_s=setup_s, wall_s=time.perf_counter() - t_start)
    if hasattr(stream, "order_record"):  # generated orders: the explicit permutation
        result["order_detail"] = stream.order_record()
    if hasattr(stream, "results_detail"):  # benchmark-specific additions (e.g. TRACE's metrics, decoding)
        result["benchmark_detail"] = stream.results_detail()
    write_json_atomic(path, result)
    checkpointer.clear()  # the results file is the durable output; the resume point is spent
    if tracker is not None:
        tracker.after_run(result, path)
    return result, path


def diverged_record(checkpointer: Checkpointer) -> Dict[str, Any]:
    """The steps finished before the divergence (the last good checkpoint's record; empty at step 1)."""
    record: Dict[str, Any] = {"acc_matrix": [], "expert_acc": [], "sar": [], "expert_source": [],
                              "step_timings": [], "pretrained_eval_s": None}
    if checkpointer.exists():
        try:
            record.update(json.loads(checkpointer.state_path.read_text())["record"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return record


def final_validation(adapter, tasks) -> List[Optional[float]]:
    """The final deployed model's accuracy on each task's validation split (null where a task has
    none): what a per-run hyperparameter search selects on, so that the test split is never read.
    The protocol loop leaves the adapter showing the final deployed model."""
    out: List[Optional[float]] = []
    for task in tasks:
        val = getattr(task, "val", None)
        out.append(None if val is None or len(val) == 0 else adapter.evaluate(task, "val"))
    return out

def cached_independent_experts(adapter, learner, config: RunConfig, cache: ExpertCache,
                               tasks) -> Optional[List[Optional[float]]]:
    """A sequential run's independent experts' accuracy (normalized ACC's denominator,
    ``cl_merge.normalization``) when the expert cache already holds every one of them; None otherwise.
    Read-only: no expert is trained for it. Leaves the adapter showing the last expert read."""
    from .expert_provider import ExpertProvider

    provider = ExpertProvider(adapter, learner, config.learner, "independent", config.seed, cache)
    if provider.cache is None:  # this learner's experts are not shared (e.g. stateful learners)
        return None
    experts = [provider.cache.peek(provider.cache_key(task, t)) for t, task in enumerate(tasks, start=1)]
    if any(e is None for e in experts):
        return None
    out: List[Optional[float]] = []
    for task, expert in zip(tasks, experts):
        adapter.set_state(expert)
        out.append(adapter.evaluate(task))
    return out


def split_fit_time(steps, sources) -> Dict[str, float]:
    """fit_s split by where each expert came from: trained now (``train_s``), read from the expert cache
    (``cache_read_s``) or opened from expert files (``expert_load_s``)."""
    per_expert: List[float] = []
    for step in steps:
        per_expert += step.get("fit_s_per_expert") or [step["fit_s"]]
    out = {"train_s": 0.0, "cache_read_s": 0.0, "expert_load_s": 0.0}
    for seconds, source in zip(per_expert, sources):
        key = "cache_read_s" if source == "cache" else "expert_load_s" if source == "checkpoint" else "train_s"
        out[key] += seconds
    return out


def assemble(config: RunConfig, task_names, model_id: str, record: Dict[str, Any], device: str,
             setup_s: float, wall_s: float, diverged: Optional[Diverged] = None) -> Dict[str, Any]:
    """The results file. A diverged run (``run.on_divergence=record``) keeps the rows it finished but
    carries no metrics (null): a leaderboard shows it as diverged, never as a number."""
    matrix = record["acc_matrix"]
    T = len(task_names)
    scores = metrics.summary(matrix, record["expert_acc"], config.protocol) if diverged is None else {}
    steps = record["step_timings"]
    scored = diverged is None
    independent_acc = (record["expert_acc"] if config.protocol in INDEPENDENT_EXPERTS
                       else record.get("independent_expert_acc"))
    timings = {
        "setup_s": setup_s,
        "pretrained_eval_s": record.get("pretrained_eval_s"),
        "fit_s": sum(s["fit_s"] for s in steps),
        "merge_s": sum(s["merge_s"] for s in steps),
        "eval_s": sum(s["eval_s"] for s in steps),
        "sar_s": sum(s.get("sar_s", 0.0) for s in steps),
        "wall_s": wall_s,
        # fit_s split by the experts' source: wall_s of two runs is comparable only with equal train_s
        **split_fit_time(steps, record.get("expert_source") or []),
        "per_step": steps,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": config.benchmark,
        "tasks": list(task_names),
        "order": config.order,
        "seed": config.seed,
        "strategy": config.label,
        "learner": config.learner,
        "merger": config.merger,
        "protocol": config.protocol,
        "hyperparameters": config.hyperparameters(),
        "acc_matrix": matrix,
        "expert_acc": record["expert_acc"],
        "acc": scores.get("acc"),
        "bwt": scores.get("bwt"),
        "bwt_denominator": None if config.protocol == "multitask" else T - 1,  # multitask: no BWT
        "fwt": scores.get("fwt"),
        "normalized_acc": scores.get("normalized_acc"),
        "normalized_acc_per_task": scores.get("normalized_acc_per_task"),
        "sar": record["sar"],
        "timings": timings,
        "peak_memory_bytes": peak_memory_bytes(device),
        "environment": environment(device),
        "git_commit": git_commit(),
        # additions beyond the stable keys
        "run_id": config.run_id(),
        "model": model_id,
        "registered_strategy": config.strategy is not None,
        "expert_source": record["expert_source"],
        "run_settings": recorded_settings(config.run_params),
        "conventions": metrics.conventions(config.protocol),
        "created": created(),
        "command_line": command_line(),
        "rerun_command": rerun_command(config),
        # the final deployed model's mergeable parameters (cl_merge.provenance.weight_sha256)
        "weight_sha256": record.get("weight_sha256"),
        # per expert: its expert-cache entry (null: not shared through the cache)
        "expert_cache_keys": record.get("expert_cache_keys"),
        # normalized ACC over the independent experts (cl_merge.normalization); normalized_acc uses the
        # run's own experts, which for sequential strategies were trained from the deployed model
        "independent_expert_acc": independent_acc,
        "normalized_acc_independent": None if not scored or independent_acc is None
        else normalized(matrix[-1], independent_acc),
        # SAR detail: `sar` is the mean over the tasks in `sar_scope` (current task, or every seen task
        # with run.sar_store=true); `sar_current` is always the current task's value
        "sar_scope": record.get("sar_scope"),
        "sar_energy": config.run_params.get("sar_energy"),
        "sar_current": record.get("sar_current"),
        "sar_per_task": record.get("sar_per_task"),
        "sar_skipped_layers": record.get("sar_skipped_layers"),
        "sar_rank_mean": record.get("sar_rank_mean"),
        # the mergers' per-step records (e.g. the α chosen on validation by merger.alpha_grid)
        "merge_record": record.get("merge_record"),
        # where the states lived: "memory" or "disk" (tensor by tensor), with per-step merge passes and sizes
        "parameter_store": {"backend": record.get("parameter_store"), "per_step": record.get("store_steps"),
                            "mergeable_bytes": record.get("mergeable_bytes")},
        # the merger's state after each step, in bytes (tensor sizes, either store): constant for most
        # mergers, growing with t for the continual TSV-M / ISO-CTS / EpiMer (docs/multitask-merging.md)
        "merger_state_bytes": record.get("merger_state_bytes"),
        # final row on the validation splits (selection data for sweeps; never the test split)
        "val_acc": record.get("val_acc"),
        "config": dict(config.to_dict(), run_params=recorded_settings(config.run_params)),
        # divergence (cl_merge.divergence): false, or true with where it happened
        "diverged": not scored,
        "divergence": None if scored else diverged.record(),
    } | _chosen_alpha(record.get("merge_record") or [])


def _chosen_alpha(merge_records) -> Dict[str, Any]:
    """``chosen_alpha`` (one value per step) for runs whose merger chose α on validation data."""
    values = [(r or {}).get("chosen_alpha") for r in merge_records]
    return {"chosen_alpha": values} if any(v is not None for v in values) else {}


def recorded_settings(run_params: Dict[str, Any]) -> Dict[str, Any]:
    """run.* settings as the results file records them: without where files are stored (run.cache_dir),
    which changes neither the run id nor a result."""
    return {k: v for k, v in run_params.items() if k not in STORAGE_SETTINGS}
