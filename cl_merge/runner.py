"""Run one resolved configuration end to end and write its results JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import metrics
from .checkpoint import Checkpointer
from .config import RunConfig, instantiate
from .errors import UserError
from .expert_cache import ExpertCache
from .io import write_json_atomic
from .progress import Reporter
from .protocol import run_protocol
from .results import SCHEMA_VERSION, ensure_results_dir, environment, git_commit, load_result, peak_memory_bytes
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
    ensure_results_dir(out_dir)
    path = result_path(config, out_dir)
    if resume and path.exists():
        return load_result(path), path

    benchmark, learner, merger, settings = instantiate(config)
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else out_dir / ".cache"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    t_start = time.perf_counter()
    with Reporter(enabled=progress) as reporter:
        t0 = time.perf_counter()
        adapter = benchmark.build_model(cache_dir=cache_dir, device=device,
                                        eval_batch_size=settings.eval_batch_size)
        stream = benchmark.build_stream(order=config.order, seed=config.seed)
        setup_s = time.perf_counter() - t0
        checkpointer = Checkpointer(out_dir / f"{config.run_id()}.ckpt", config.fingerprint())
        cache = ExpertCache(cache_dir / "experts") if settings.expert_cache else None
        # past tasks' updates for SAR live in the checkpoint directory: kept for resume, removed with it
        sar = (SARMeter(settings.sar_energy, checkpointer.directory / "sar" if settings.sar_store else None,
                        qkv=settings.sar_qkv) if settings.sar else None)
        if getattr(benchmark, "streaming", False):
            # states on disk, merged layer by layer (cl_merge.streaming_protocol; e.g. mergebench)
            record = benchmark.run_stream(stream=stream, adapter=adapter, learner=learner, merger=merger,
                                          protocol=config.protocol, checkpointer=checkpointer, resume=resume,
                                          reporter=reporter, settings=settings)
        else:
            record = run_protocol(stream=stream, adapter=adapter, learner=learner, learner_name=config.learner,
                                  merger=merger, protocol=config.protocol, seed=config.seed,
                                  eval_unseen=settings.eval_unseen, checkpointer=checkpointer, resume=resume,
                                  cache=cache, reporter=reporter, sar=sar)
            record["val_acc"] = final_validation(adapter, stream.tasks, record["deployed"])
    result = assemble(config, stream.names, adapter.model_id, record, device,
                      setup_s=setup_s, wall_s=time.perf_counter() - t_start)
    if hasattr(stream, "order_record"):  # generated orders: the explicit permutation
        result["order_detail"] = stream.order_record()
    if hasattr(stream, "results_detail"):  # benchmark-specific additions (e.g. TRACE's metrics, decoding)
        result["benchmark_detail"] = stream.results_detail()
    write_json_atomic(path, result)
    checkpointer.clear()  # the results file is the durable output; the resume point is spent
    return result, path


def final_validation(adapter, tasks, deployed) -> List[Optional[float]]:
    """The final deployed model's accuracy on each task's validation split (null where a task has
    none): what a per-run hyperparameter search selects on, so that the test split is never read."""
    adapter.set_state(deployed)
    out: List[Optional[float]] = []
    for task in tasks:
        val = getattr(task, "val", None)
        out.append(None if val is None or len(val) == 0 else adapter.evaluate(task, "val"))
    return out


def assemble(config: RunConfig, task_names, model_id: str, record: Dict[str, Any], device: str,
             setup_s: float, wall_s: float) -> Dict[str, Any]:
    matrix = record["acc_matrix"]
    T = len(task_names)
    steps = record["step_timings"]
    timings = {
        "setup_s": setup_s,
        "pretrained_eval_s": record["pretrained_eval_s"],
        "fit_s": sum(s["fit_s"] for s in steps),
        "merge_s": sum(s["merge_s"] for s in steps),
        "eval_s": sum(s["eval_s"] for s in steps),
        "sar_s": sum(s.get("sar_s", 0.0) for s in steps),
        "wall_s": wall_s,
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
        "acc": metrics.acc(matrix),
        "bwt": metrics.bwt(matrix),
        "bwt_denominator": T - 1,
        "fwt": metrics.fwt(matrix),
        "normalized_acc": metrics.mean_normalized_accuracy(matrix, record["expert_acc"]),
        "normalized_acc_per_task": metrics.normalized_accuracy(matrix, record["expert_acc"]),
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
        "run_settings": config.run_params,
        "conventions": metrics.CONVENTIONS,
        # SAR detail: `sar` is the mean over the tasks in `sar_scope` (current task, or every seen task
        # with run.sar_store=true); `sar_current` is always the current task's value
        "sar_scope": record.get("sar_scope"),
        "sar_energy": config.run_params.get("sar_energy"),
        "sar_current": record.get("sar_current"),
        "sar_per_task": record.get("sar_per_task"),
        "sar_skipped_layers": record.get("sar_skipped_layers"),
        "sar_rank_mean": record.get("sar_rank_mean"),
        # final row on the validation splits (selection data for sweeps; never the test split)
        "val_acc": record.get("val_acc"),
        "config": config.to_dict(),
    } | ({"chosen_alpha": record["chosen_alpha"]} if "chosen_alpha" in record else {})  # merger.alpha_grid
