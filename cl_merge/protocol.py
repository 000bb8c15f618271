"""The one protocol loop every strategy and every benchmark runs under (docs/):

    deployed ← θ0
    for t, task in stream:
        start  ← θ0 (independent) | deployed (sequential)
        expert ← learner.fit(start, task)   (or the expert cache, independent only; or its checkpoint file)
        deployed ← merge_step(merger, θ0, deployed, expert, start, t)
        sar[t] ← SAR(expert − start, deployed − θ0)  (+ every earlier task with run.sar_store=true)
        row t ← evaluate(deployed, every task)     (unseen cells null if run.eval_unseen=false)
        checkpoint(t)

Every state lives in a parameter store (``cl_merge.store``): in memory by default, tensor by tensor on
disk when the benchmark asks for it (MergeBench). The loop, the merge executor and SAR read and write
stores one tensor at a time, so the algorithm, the record and the results are the same on both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional

from .checkpoint import Checkpointer, load_optional
from .divergence import check_step
from .expert_cache import ExpertCache
from .expert_provider import ExpertProvider, fit_seed  # noqa: F401  (fit_seed: part of this module's API)
from .learner import Learner
from .merge_engine import MergeContext, StepInputs, merge_step, spec_of, split_state
from .merger import Merger
from .models.base import ModelAdapter
from .progress import Reporter
from .sar import SARMeter
from .store import MemoryStorage, Storage
from .task import Stream, Task


def evaluate_row(adapter: ModelAdapter, tasks: List[Task], seen: int, eval_unseen: bool,
                 reporter: Reporter, label: str,
                 before_task: Optional[Callable[[Task], None]] = None) -> List[Optional[float]]:
    """One row of the accuracy matrix; ``before_task`` runs before each task's evaluation."""
    row: List[Optional[float]] = []
    with reporter.task(label, total=len(tasks)) as bar:
        for i, task in enumerate(tasks, start=1):
            if before_task is not None:
                before_task(task)
            row.append(adapter.evaluate(task) if (i <= seen or eval_unseen) else None)
            bar.advance()
    return row


@dataclasses.dataclass
class StepRecord:
    """What the loop records for one step; ``append_to`` writes it into the run record's per-step lists
    (the results JSON keeps those lists: ``acc_matrix``, ``expert_acc``, ``sar``, ...)."""

    step: int
    task: str
    row: List[Optional[float]]
    expert_acc: float
    expert_source: str
    sar: Dict[str, Any]  # sar, current, per_task, skipped_layers, rank_mean (empty with run.sar=false)
    timings: Dict[str, float]  # fit_s, merge_s, eval_s, sar_s
    merge: Dict[str, Any]  # the merger's own per-step record (MergeContext.record), e.g. chosen_alpha
    store: Dict[str, Any]  # the parameter store's: merge passes, peak live bytes, file/tensor bytes

    def append_to(self, record: Dict[str, Any]) -> None:
        record["acc_matrix"].append(self.row)
        record["expert_acc"].append(self.expert_acc)
        record["sar"].append(self.sar.get("sar"))  # null when run.sar=false
        record["sar_current"].append(self.sar.get("current"))
        record["sar_per_task"].append(self.sar.get("per_task"))
        record["sar_skipped_layers"].append(self.sar.get("skipped_layers"))
        record["sar_rank_mean"].append(self.sar.get("rank_mean"))
        record["expert_source"].append(self.expert_source)
        record["step_timings"].append(self.timings)
        record["merge_record"].append(self.merge)
        record["store_steps"].append(self.store)


PER_STEP_KEYS = ("acc_matrix", "expert_acc", "sar", "expert_source", "step_timings", "sar_current", "sar_per_task",
                 "sar_skipped_layers", "sar_rank_mean", "merge_record", "store_steps")


def run_protocol(*, stream: Stream, adapter: ModelAdapter, learner: Learner, learner_name: str,
                 merger: Merger, protocol: str, seed: int, eval_unseen: bool,
                 checkpointer: Checkpointer, resume: bool, cache: Optional[ExpertCache],
                 reporter: Reporter, sar: Optional[SARMeter] = None,
                 storage: Optional[Storage] = None) -> Dict[str, Any]:
    storage = storage or MemoryStorage()
    storage.check_run(protocol, learner)
    tasks = stream.tasks
    T = len(tasks)
    for task in tasks:
        adapter.prepare(task)
    theta0 = storage.theta0(adapter)
    names = list(theta0)
    merger.reset()

    def evaluate(label: str, seen: int) -> List[Optional[float]]:
        return evaluate_row(adapter, tasks, seen, eval_unseen, reporter, label,
                            before_task=lambda task: stream.set_phase(label, task.name))

    resumed = load_optional(checkpointer, resume)
    if resumed is not None:
        done, record, tensors = resumed
        deployed, state = storage.restore(record, tensors)
        scalars = split_state(state)[1]
        if scalars:
            merger.load_scalar_state(scalars)
        learner.load_state_dict(tensors.get("learner", {}))
        reporter.log(f"resuming after step {done}/{T}")
    else:
        checkpointer.clear()
        done, deployed, state = 0, theta0, storage.empty_state()
        t0 = time.perf_counter()
        adapter.set_state(theta0)
        # row 0 is the pre-trained model on every task: the zero-shot reference (and FWT's baseline)
        row0 = evaluate("evaluate θ0", T)
        record = {key: [] for key in PER_STEP_KEYS}
        record.update(acc_matrix=[row0], pretrained_eval_s=time.perf_counter() - t0)
    for key in PER_STEP_KEYS:
        record.setdefault(key, [None] * (len(record["expert_acc"])))  # records of older checkpoints
    record["sar_scope"] = sar.scope if sar is not None else None
    record["parameter_store"] = storage.kind
    record["mergeable_bytes"] = sum(math.prod(spec_of(theta0, n)[1]) * 4 for n in names)

    experts = ExpertProvider(adapter, learner, learner_name, protocol, seed, cache, reporter, storage.kind)
    for t in range(done + 1, T + 1):
        task = tasks[t - 1]
        start = theta0 if protocol == "independent" else deployed
        t_fit = time.perf_counter()
        if storage.experts_from_files:
            expert, source = storage.open_expert(learner, task, names)
        else:
            expert, source = experts.get(task, t, start, label=f"step {t}/{T} fine-tune {task.name}")
            expert = storage.wrap(expert)
        fit_s = time.perf_counter() - t_fit

        t_eval = time.perf_counter()
        with storage.showing_expert(adapter, expert):
            stream.set_phase(f"expert {t}", task.name)
            expert_acc = adapter.evaluate(task)
        eval_s = time.perf_counter() - t_eval

        # mergers that pick a hyperparameter on data (e.g. isotropic's alpha_grid) score candidate
        # states on the current task's validation split, never its test split
        def validation_score(candidate, task=task) -> float:
            adapter.set_state(candidate)
            stream.set_phase(f"step {t}/{T} validation", task.name)
            return adapter.evaluate(task, "val")

        context = MergeContext(step=t, validation_score=validation_score)
        deployed_writer, state_writer, scratch_writer, release = storage.writers(t)
        storage.reset_peak()
        result = merge_step(merger, StepInputs(theta0, deployed, expert, start, t), state,
                            deployed_writer=deployed_writer, state_writer=state_writer,
                            scratch_writer=scratch_writer, release=release, context=context, names=names)
        store_info = {"merge_passes": result.passes, "merge_peak_live_bytes": storage.tracker_peak(),
                      **storage.step_info(result.deployed, result.state)}
        # non-finite expert or merged weights stop the run before its checkpoint (divergence.py)
        check_step(t, task.name, expert, result.deployed)

        t_sar = time.perf_counter()
        sar_step = sar.step(t, theta0, start, expert, result.deployed) if sar is not None else {}
        sar_s = time.perf_counter() - t_sar

        t_eval = time.perf_counter()
        adapter.set_state(result.deployed)
        row = evaluate(f"step {t}/{T} evaluate", t)
        eval_s += time.perf_counter() - t_eval

        StepRecord(step=t, task=task.name, row=row, expert_acc=expert_acc, expert_source=source, sar=sar_step,
                   timings={"fit_s": fit_s, "merge_s": result.merge_s, "eval_s": eval_s, "sar_s": sar_s},
                   merge=context.record, store=store_info).append_to(record)
        record.update(storage.checkpoint_record(result.deployed, result.state))
        checkpointer.save(t, record, {**storage.checkpoint_tensors(result.deployed, result.state),
                                      "learner": learner.state_dict()})
        if deployed is not theta0:  # the previous step's stores are no longer a resume point
            storage.discard(deployed, state)
        deployed, state = result.deployed, result.state
        reporter.log(f"step {t}/{T} {task.name}: expert {_fmt(expert_acc)}, deployed on it {_fmt(row[t - 1])}"
                     f" ({source})")
    adapter.set_state(deployed)
    record["deployed"] = deployed
    return record


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
