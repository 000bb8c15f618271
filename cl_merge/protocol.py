"""The one protocol loop every strategy runs under (DESIGN.md):

    deployed ← θ0
    for t, task in stream:
        start  ← θ0 (independent) | deployed (sequential)
        expert ← learner.fit(start, task)          (or the expert cache, independent only)
        deployed ← merger.merge(θ0, deployed, expert, start, t)
        sar[t] ← SAR(expert − start, deployed − θ0)  (+ every earlier task with run.sar_store=true)
        row t ← evaluate(deployed, every task)     (unseen cells null if run.eval_unseen=false)
        checkpoint(t)
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Callable, Dict, List, Optional

from .checkpoint import Checkpointer, load_optional
from .divergence import check_step
from .expert_cache import ExpertCache, expert_key
from .learner import FitContext, Learner
from .merger import Merger
from .models.base import ModelAdapter
from .params import clone
from .progress import Reporter
from .sar import SARMeter
from .task import Stream, Task


def fit_seed(seed: int, task: Task, step: int, protocol: str) -> int:
    """Per-fit seed from stable ingredients, so a resumed run and an uninterrupted one draw the same
    batches. Independent experts do not depend on their position (that is what makes them cacheable)."""
    position = 0 if protocol == "independent" else step
    return zlib.crc32(f"{seed}:{task.name}:{position}".encode()) & 0x7FFFFFFF


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


def _validation_score(adapter: ModelAdapter, state, task: Task) -> float:
    adapter.set_state(state)
    return adapter.evaluate(task, "val")


def run_protocol(*, stream: Stream, adapter: ModelAdapter, learner: Learner, learner_name: str,
                 merger: Merger, protocol: str, seed: int, eval_unseen: bool,
                 checkpointer: Checkpointer, resume: bool, cache: Optional[ExpertCache],
                 reporter: Reporter, sar: Optional[SARMeter] = None) -> Dict[str, Any]:
    tasks = stream.tasks
    T = len(tasks)
    for task in tasks:
        adapter.prepare(task)
    theta0 = adapter.get_state()
    merger.reset(theta0)

    resumed = load_optional(checkpointer, resume)
    if resumed is not None:
        done, record, tensors = resumed
        deployed = tensors["deployed"]
        merger.load_state_dict(tensors.get("merger", {}))
        learner.load_state_dict(tensors.get("learner", {}))
        reporter.log(f"resuming after step {done}/{T}")
    else:
        checkpointer.clear()
        done, deployed = 0, clone(theta0)
        t0 = time.perf_counter()
        # row 0 is the pre-trained model on every task: the zero-shot reference (and FWT's baseline)
        row0 = evaluate_row(adapter, tasks, T, True, reporter, "evaluate θ0")
        record = {"acc_matrix": [row0], "expert_acc": [], "sar": [], "expert_source": [],
                  "step_timings": [], "pretrained_eval_s": time.perf_counter() - t0}
    for key in ("sar_current", "sar_per_task", "sar_skipped_layers", "sar_rank_mean"):
        record.setdefault(key, [])
    record["sar_scope"] = sar.scope if sar is not None else None

    use_cache = (cache is not None and protocol == "independent" and learner.cacheable
                 and not learner.stateful)
    for t in range(done + 1, T + 1):
        task = tasks[t - 1]
        start = theta0 if protocol == "independent" else deployed
        ctx_seed = fit_seed(seed, task, t, protocol)
        t_fit = time.perf_counter()
        expert, source = None, learner.expert_source
        if use_cache:
            key = expert_key(adapter.base_fingerprint(), task.fingerprint, learner_name, learner.config(), ctx_seed)
            expert = cache.get(key)
            source = "cache" if expert is not None else learner.expert_source
        if expert is None:
            steps = getattr(learner, "steps", None) or 0
            with reporter.task(f"step {t}/{T} fine-tune {task.name}", total=steps) as bar:
                ctx = FitContext(adapter=adapter, task=task, step=t, seed=ctx_seed,
                                 on_iteration=lambda i, loss: bar.update(i, f"loss {loss:.3f}"))
                expert = learner.fit(clone(start), ctx)
            if use_cache:
                cache.put(key, expert)
        fit_s = time.perf_counter() - t_fit

        t_eval = time.perf_counter()
        adapter.set_state(expert)
        expert_acc = adapter.evaluate(task)
        eval_s = time.perf_counter() - t_eval

        t_merge = time.perf_counter()
        # mergers that pick a hyperparameter on data (e.g. isotropic's alpha_grid) score candidate
        # states on the current task's validation split, never its test split
        binds = hasattr(merger, "bind_validation")
        if binds:
            merger.bind_validation(lambda state, task=task: _validation_score(adapter, state, task))
        try:
            deployed = merger.merge(base=theta0, previous=deployed, expert=expert, start=start, step=t)
        finally:
            if binds:
                merger.bind_validation(None)
        if getattr(merger, "chosen_alpha", None) is not None and getattr(merger, "alpha_grid", ()):
            record.setdefault("chosen_alpha", []).append(merger.chosen_alpha)
        merge_s = time.perf_counter() - t_merge
        check_step(t, task.name, expert, deployed)  # non-finite expert/merged weights stop the run (divergence.py)

        t_sar = time.perf_counter()
        sar_step = sar.step(t, theta0, start, expert, deployed) if sar is not None else {}
        sar_s = time.perf_counter() - t_sar

        t_eval = time.perf_counter()
        adapter.set_state(deployed)
        row = evaluate_row(adapter, tasks, t, eval_unseen, reporter, f"step {t}/{T} evaluate")
        eval_s += time.perf_counter() - t_eval

        record["acc_matrix"].append(row)
        record["expert_acc"].append(expert_acc)
        record["sar"].append(sar_step.get("sar"))  # null when run.sar=false
        record["sar_current"].append(sar_step.get("current"))
        record["sar_per_task"].append(sar_step.get("per_task"))
        record["sar_skipped_layers"].append(sar_step.get("skipped_layers"))
        record["sar_rank_mean"].append(sar_step.get("rank_mean"))
        record["expert_source"].append(source)
        record["step_timings"].append({"fit_s": fit_s, "merge_s": merge_s, "eval_s": eval_s, "sar_s": sar_s})
        checkpointer.save(t, record, {"deployed": deployed, "merger": merger.state_dict(),
                                      "learner": learner.state_dict()})
        reporter.log(f"step {t}/{T} {task.name}: expert {expert_acc:.3f}, deployed on it {row[t - 1]:.3f}"
                     f" ({source})")
    adapter.set_state(deployed)
    record["deployed"] = deployed
    return record
