"""The protocol loop of ``cl_merge.protocol`` with the model states on disk (checkpoint experts).

Same algorithm, same record (row 0 = θ0, the expert on its own task, deployed on every task per step,
per-step timings, a resume point per step), for models of which only one copy fits comfortably:

    θ0, expert_t          : safetensors checkpoints, read one tensor at a time
    deployed_t, merger state : files in the run's checkpoint folder, written one tensor at a time
    the live model        : the adapter's model, the only model in memory; a state is "set" by copying
                            its tensors into it one at a time

Only the independent protocol with experts from files runs this way (``learner.open_expert``): a
learner that trains needs the whole model in memory anyway. SAR (current task) is computed per layer
in one extra pass (``run.sar``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .checkpoint import Checkpointer, load_optional
from .errors import UserError
from .merger import Merger
from .progress import Reporter
from .protocol import evaluate_row as protocol_row
from .sar import layer_sar, top_basis
from .streaming import LiveTensors, TensorSource
from .streaming_merge import MergeStep, stream_merge
from .task import Stream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def load_into(model: torch.nn.Module, source, names=None) -> int:
    """Copy tensors of ``source`` (name -> tensor) into the same-named parameters of ``model``, one at a
    time. ``names`` restricts the copy; returns the number of tensors copied."""
    params = dict(model.named_parameters())
    count = 0
    for name in (names if names is not None else list(source)):
        p = params.get(name)
        if p is None:
            continue
        p.copy_(source[name].to(device=p.device, dtype=p.dtype))
        count += 1
    return count


def run_streaming_protocol(*, stream: Stream, adapter, learner, merger: Merger, protocol: str,
                           checkpointer: Checkpointer, resume: bool, reporter: Reporter, base_path: Path,
                           eval_unseen: bool = True, sar: bool = False, sar_energy: float = 0.95,
                           store_dtype: str = "float32", merge_device: str = "cpu",
                           expert_eval_full: bool = True, tracker: Optional[LiveTensors] = None) -> Dict[str, Any]:
    if protocol != "independent":
        raise UserError("this benchmark merges published experts: only --protocol independent runs here "
                        "(sequential fine-tuning on its training data is not implemented)")
    if not hasattr(learner, "open_expert"):
        raise UserError(f"learner {getattr(learner, 'name', learner)} trains its experts; this benchmark streams "
                        "experts from checkpoints: use --learner checkpoint")
    dtype = DTYPES[store_dtype]
    tracker = tracker or LiveTensors()
    tasks = stream.tasks
    T = len(tasks)
    names = list(adapter.trainable_parameters())
    work = checkpointer.directory / "stream"
    work.mkdir(parents=True, exist_ok=True)

    def open_source(path, label, names_=names, dtype_=torch.float32):
        return TensorSource(path, names=names_, dtype=dtype_, device=merge_device, tracker=tracker, label=label)

    base = open_source(base_path, f"base {base_path}")
    model_names = [n for n, _ in adapter.model.named_parameters()]
    base_all = TensorSource(base_path, names=[n for n in model_names if n in _keys(base_path)], tracker=tracker,
                            label=f"base {base_path}")

    def evaluate_row(label: str, seen: int) -> List[Optional[float]]:
        return protocol_row(adapter, tasks, seen, eval_unseen, reporter, label,
                            before_task=lambda task: _set_phase(stream, label, task.name))

    resumed = load_optional(checkpointer, resume)
    if resumed is not None:
        done, record, _ = resumed
        reporter.log(f"resuming after step {done}/{T}")
    else:
        checkpointer.clear()
        work.mkdir(parents=True, exist_ok=True)
        done = 0
        t0 = time.perf_counter()
        load_into(adapter.model, base_all)
        row0 = evaluate_row("evaluate θ0", T)
        record = {"acc_matrix": [row0], "expert_acc": [], "sar": [], "expert_source": [], "step_timings": [],
                  "pretrained_eval_s": time.perf_counter() - t0, "stream_files": {}, "streaming": []}
    for key in ("sar_current", "sar_per_task", "sar_skipped_layers", "sar_rank_mean"):
        record.setdefault(key, [])
    record["sar_scope"] = "current_task" if sar else None

    previous_path = Path(record["stream_files"]["deployed"]) if done else None
    state_path = Path(record["stream_files"]["state"]) if done else None
    for t in range(done + 1, T + 1):
        task = tasks[t - 1]
        t_fit = time.perf_counter()
        expert_ref = learner.expert_path(task)
        expert = open_source(expert_ref, f"expert {task.name} ({expert_ref})")
        fit_s = time.perf_counter() - t_fit

        t_eval = time.perf_counter()
        expert_all = (TensorSource(expert_ref, names=[n for n in model_names if n in _keys(expert_ref)],
                                   tracker=tracker) if expert_eval_full else expert)
        load_into(adapter.model, expert_all)
        _set_phase(stream, f"expert {t}", task.name)
        expert_acc = adapter.evaluate(task)
        load_into(adapter.model, base_all)  # back to θ0 everywhere (non-merged tensors included)
        eval_s = time.perf_counter() - t_eval

        previous = open_source(previous_path, f"deployed step {t - 1}") if previous_path else base
        out_path = work / f"deployed-{t}.safetensors"
        new_state = work / f"merger-state-{t}.safetensors"
        tracker.reset_peak()
        step = MergeStep(names, base=base, previous=previous, expert=expert, start=base, step=t,
                         out_path=out_path, state_in=state_path, state_out=new_state, store_dtype=dtype,
                         device=merge_device, tracker=tracker)
        t_merge = time.perf_counter()
        info = stream_merge(merger, step)
        merge_s = time.perf_counter() - t_merge
        merge_peak = tracker.peak

        deployed = open_source(out_path, f"deployed step {t}")
        t_sar = time.perf_counter()
        sar_value = sar_layers = sar_skipped = rank_mean = None
        if sar:
            sar_value, sar_layers, sar_skipped, rank_mean = _streamed_sar(names, base, deployed, expert, sar_energy)
        sar_s = time.perf_counter() - t_sar

        t_eval = time.perf_counter()
        load_into(adapter.model, deployed)
        row = evaluate_row(f"step {t}/{T} evaluate", t)
        eval_s += time.perf_counter() - t_eval

        record["acc_matrix"].append(row)
        record["expert_acc"].append(expert_acc)
        record["sar"].append(sar_value)
        record["sar_current"].append(sar_value)
        record["sar_per_task"].append(None)
        record["sar_skipped_layers"].append(sar_skipped)
        record["sar_rank_mean"].append(rank_mean)
        record["expert_source"].append(f"checkpoint:{expert_ref}")
        record["step_timings"].append({"fit_s": fit_s, "merge_s": merge_s, "eval_s": eval_s, "sar_s": sar_s})
        record["streaming"].append({"step": t, "merge_passes": info["passes"],
                                    "merge_peak_live_bytes": merge_peak,
                                    "deployed_file_bytes": out_path.stat().st_size,
                                    "state_file_bytes": new_state.stat().st_size})
        record["stream_files"] = {"deployed": str(out_path), "state": str(new_state)}
        checkpointer.save(t, record, {})
        for old in (previous_path, state_path):  # the previous step's files are no longer a resume point
            if old is not None and old.exists():
                old.unlink()
        previous_path, state_path = out_path, new_state
        reporter.log(f"step {t}/{T} {task.name}: expert {_fmt(expert_acc)}, deployed on it {_fmt(row[t - 1])}")
    record["deployed_path"] = str(previous_path) if previous_path else None
    record["mergeable_bytes"] = sum(math.prod(base.spec(n)[1]) * 4 for n in names)
    return record


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _keys(path) -> set:
    from .streaming import checkpoint_files

    return set(checkpoint_files(Path(path)))


def _set_phase(stream, phase: str, task: str) -> None:
    if hasattr(stream, "set_phase"):
        stream.set_phase(phase, task)


def _streamed_sar(names, base, deployed, expert, energy):
    from .sar import sar_layers

    values, skipped, ranks = [], 0, []
    for n in names:
        b = base[n]
        if not sar_layers(n, b):
            continue
        merged_blocks = sar_layers(n, deployed[n] - b)
        task_blocks = sar_layers(n, expert[n] - b)
        for (_, merged), (_, task) in zip(merged_blocks, task_blocks):
            basis = top_basis(merged, energy)
            v = None if basis is None else layer_sar(task, basis)
            if basis is not None:
                ranks.append(basis.shape[1])
            if v is None:
                skipped += 1
            else:
                values.append(v)
    mean = sum(values) / len(values) if values else None
    return mean, len(values), skipped, (sum(ranks) / len(ranks) if ranks else None)
