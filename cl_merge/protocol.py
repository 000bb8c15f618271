"""The one protocol loop every strategy and every benchmark runs under (docs/):

    deployed ← θ0
    for t, task in stream:
        start  ← θ0 (independent) | deployed (sequential)
        expert ← learner.fit(start, task)   (or the expert cache, independent only; or its checkpoint file)
        deployed ← merge_step(merger, θ0, deployed, expert, start, t)
        sar[t] ← SAR(expert − start, deployed − θ0)  (+ every earlier task with run.sar_store=true)
        row t ← evaluate(deployed, every task)     (unseen cells null if run.eval_unseen=false)
        checkpoint(t)

    multitask protocol (every expert from θ0, one merge; docs/protocol.md):
    for t, task in stream:
        expert_t ← learner.fit(θ0, task)   (or the expert cache, shared with the independent runs)
        fisher_t ← Fisher diagonal of expert_t   (mergers that need one; cached beside the expert)
    deployed ← merge_at_once(merger, θ0, experts, fishers)
    sar ← SAR(expert_t − θ0, deployed − θ0) for every task;  row 1 ← evaluate(deployed, every task)

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
from .errors import UserError
from .expert_cache import ExpertCache
from .expert_provider import ExpertProvider, fit_seed  # noqa: F401  (fit_seed: part of this module's API)
from .learner import Learner
from .merge_engine import MergeContext, StepInputs, logical_bytes, merge_step, spec_of, split_state
from .merger import Merger
from .multitask_merge import merge_at_once
from .models.base import ModelAdapter
from .progress import Reporter
from .fisher import FisherSettings, expert_fisher
from .sar import MergedBasis, SARMeter, mean_or_none
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
                 "sar_skipped_layers", "sar_rank_mean", "merge_record", "store_steps", "merger_state_bytes",
                 "expert_cache_keys")


def run_protocol(*, stream: Stream, adapter: ModelAdapter, learner: Learner, learner_name: str,
                 merger: Merger, protocol: str, seed: int, eval_unseen: bool,
                 checkpointer: Checkpointer, resume: bool, cache: Optional[ExpertCache],
                 reporter: Reporter, sar: Optional[SARMeter] = None,
                 storage: Optional[Storage] = None, tracker=None) -> Dict[str, Any]:
    storage = storage or MemoryStorage()
    storage.check_run(protocol, learner)
    multitask = protocol == "multitask"
    if getattr(merger, "needs_fisher", False) and type(adapter).per_sample_loss is ModelAdapter.per_sample_loss:
        # before any expert is trained: the Fisher diagonal needs the adapter's functional per-sample loss
        raise UserError(f"merger {merger.name} needs Fisher diagonals, but {type(adapter).__name__} has no "
                        "per-sample loss; choose a merger that needs no Fisher (e.g. tsv_m, iso_c)")
    tasks = stream.tasks
    T = len(tasks)
    for task in tasks:
        adapter.prepare(task)
    theta0 = storage.theta0(adapter)
    names = list(theta0)
    if not multitask:
        merger.reset()

    def evaluate(label: str, seen: int) -> List[Optional[float]]:
        return evaluate_row(adapter, tasks, seen, eval_unseen, reporter, label,
                            before_task=lambda task: stream.set_phase(label, task.name))

    # multitask runs keep no per-step checkpoint: a resumed (re-run) one finds its experts and Fishers in
    # the expert cache, written as each was made, and redoes only the merge and its evaluation
    resumed = None if multitask else load_optional(checkpointer, resume)
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
    gathered = Gathered() if multitask else None  # multitask: every expert, merged once after the loop
    for t in range(done + 1, T + 1):
        task = tasks[t - 1]
        start = deployed if protocol == "sequential" else theta0
        t_fit = time.perf_counter()
        if storage.experts_from_files:
            expert, source = storage.open_expert(learner, task, names)
        else:
            expert, source = experts.get(task, t, start, label=f"step {t}/{T} fine-tune {task.name}")
            expert = storage.wrap(expert)
        fit_s = time.perf_counter() - t_fit
        # which expert-cache entry the step used (null: not shared through the cache)
        record["expert_cache_keys"].append(
            experts.cache_key(task, t) if experts.cache is not None and not storage.experts_from_files else None)

        t_eval = time.perf_counter()
        with storage.showing_expert(adapter, expert):
            stream.set_phase(f"expert {t}", task.name)
            expert_acc = adapter.evaluate(task)
        eval_s = time.perf_counter() - t_eval
        if gathered is not None:
            check_step(t, task.name, expert, expert)
            gathered.add(expert, expert_acc, source, fit_s, eval_s)
            if getattr(merger, "needs_fisher", False):
                gathered.add_fisher(*expert_fisher(adapter, task, expert, fisher_settings(merger, seed),
                                                   experts.cache, experts.cache_key(task, t)
                                                   if experts.cache is not None else None))
            reporter.log(f"expert {t}/{T} {task.name}: {_fmt(expert_acc)} ({source})")
            continue

        # mergers that pick a hyperparameter on data (e.g. isotropic's alpha_grid) score candidate
        # states on the current task's validation split, never its test split
        def validation_score(candidate, task=task) -> float:
            adapter.set_state(candidate)
            stream.set_phase(f"step {t}/{T} validation", task.name)
            return adapter.evaluate(task, "val")

        context = MergeContext(step=t, validation_score=validation_score, tasks=T)
        if getattr(merger, "needs_fisher", False):  # continual EpiMer: the current expert's Fisher diagonal
            # the independent protocol's experts are the multitask protocol's: same cache entry for the Fisher
            key = experts.cache_key(task, t) if experts.cache is not None and protocol == "independent" else None
            fisher, samples, seconds, fisher_source = expert_fisher(
                adapter, task, dict(expert), fisher_settings(merger, seed), experts.cache, key)
            context.fisher = fisher
            context.record.update(fisher_samples=samples, fisher_s=seconds, fisher_source=fisher_source)
        deployed_writer, state_writer, scratch_writer, release = storage.writers(t)
        storage.reset_peak()
        with reporter.task(f"step {t}/{T} merge ({merger.name})", total=None):
            result = merge_step(merger, StepInputs(theta0, deployed, expert, start, t), state,
                                deployed_writer=deployed_writer, state_writer=state_writer,
                                scratch_writer=scratch_writer, release=release, context=context, names=names)
        store_info = {"merge_passes": result.passes, "merge_peak_live_bytes": storage.tracker_peak(),
                      **storage.step_info(result.deployed, result.state)}
        record["merger_state_bytes"].append(logical_bytes(result.state))
        # non-finite expert or merged weights stop the run before its checkpoint (divergence.py)
        check_step(t, task.name, expert, result.deployed)

        t_sar = time.perf_counter()
        with reporter.task(f"step {t}/{T} SAR", total=None):
            sar_step = sar.step(t, theta0, start, expert, result.deployed) if sar is not None else {}
        sar_s = time.perf_counter() - t_sar

        t_eval = time.perf_counter()
        adapter.set_state(result.deployed)
        row = evaluate(f"step {t}/{T} evaluate", t)
        eval_s += time.perf_counter() - t_eval

        step_record = StepRecord(step=t, task=task.name, row=row, expert_acc=expert_acc, expert_source=source,
                                 sar=sar_step, timings={"fit_s": fit_s, "merge_s": result.merge_s, "eval_s": eval_s,
                                                        "sar_s": sar_s}, merge=context.record, store=store_info)
        step_record.append_to(record)
        if tracker is not None:  # experiment tracking (cl_merge.tracking), after the step is recorded
            tracker.after_step(step_record, record)
        record.update(storage.checkpoint_record(result.deployed, result.state))
        checkpointer.save(t, record, {**storage.checkpoint_tensors(result.deployed, result.state),
                                      "learner": learner.state_dict()})
        if deployed is not theta0:  # the previous step's stores are no longer a resume point
            storage.discard(deployed, state)
        deployed, state = result.deployed, result.state
        reporter.log(f"step {t}/{T} {task.name}: expert {_fmt(expert_acc)}, deployed on it {_fmt(row[t - 1])}"
                     f" ({source})")
    if gathered is not None:
        deployed = gathered.merge(merger, adapter, theta0, tasks, sar, record, evaluate)
        if tracker is not None:
            tracker.after_merge(record)
        reporter.log(f"multitask merge of {T} experts: ACC {_fmt(sum(record['acc_matrix'][-1]) / T)}")
    adapter.set_state(deployed)
    record["deployed"] = deployed
    return record


def fisher_settings(merger, seed: int) -> FisherSettings:
    """How the Fisher diagonals of a merger that needs them are estimated (its ``fisher_*`` fields)."""
    return FisherSettings(fraction=getattr(merger, "fisher_fraction", FisherSettings.fraction),
                          min_samples=getattr(merger, "fisher_min_samples", FisherSettings.min_samples), seed=seed)


class Gathered:
    """The multitask protocol's experts (and Fishers), then its one merge and its record (module doc).

    Record convention (docs/protocol.md): ``acc_matrix`` = [row 0 (θ0), the merged model's row];
    ``expert_acc`` / ``expert_source`` one entry per task; every other per-step list one entry, the merge."""

    def __init__(self):
        self.experts: List[Dict[str, Any]] = []
        self.record_expert: List[tuple] = []  # (expert_acc, expert_source) per task
        self.fishers: List[Dict[str, Any]] = []
        self.fisher_info: Dict[str, list] = {"fisher_samples": [], "fisher_s": [], "fisher_source": []}
        self.fit_s = self.eval_s = 0.0
        self.fit_s_per_expert: List[float] = []  # training or cache read, per expert (timings.train_s)

    def add(self, expert, expert_acc: float, source: str, fit_s: float, eval_s: float) -> None:
        self.experts.append(dict(expert))
        self.record_expert.append((expert_acc, source))
        self.fit_s += fit_s
        self.fit_s_per_expert.append(fit_s)
        self.eval_s += eval_s

    def add_fisher(self, diagonal, samples, seconds, source) -> None:
        self.fishers.append(diagonal)
        for key, value in zip(self.fisher_info, (samples, seconds, source)):
            self.fisher_info[key].append(value)

    def merge(self, merger, adapter: ModelAdapter, theta0, tasks: List[Task], sar: Optional[SARMeter],
              record: Dict[str, Any], evaluate: Callable[[str, int], List[Optional[float]]]):
        T = len(tasks)
        t0 = time.perf_counter()
        merged = merge_at_once(merger, dict(theta0), self.experts, fishers=self.fishers or None)
        merge_s = time.perf_counter() - t0
        check_step(T, "multitask merge", merged, merged)

        t_sar = time.perf_counter()
        sar_step: Dict[str, Any] = {}
        if sar is not None:  # every task's own update against the one merged model
            basis = MergedBasis.from_states(merged, theta0, sar.energy, sar.table)
            scores = [basis.score({n: e[n] - theta0[n] for n in basis.parameters}) for e in self.experts]
            ranks = list(basis.ranks.values())
            sar_step = {"per_task": [s.value for s in scores], "sar": mean_or_none([s.value for s in scores]),
                        "current": None, "skipped_layers": sum(s.skipped for s in scores),
                        "rank_mean": sum(ranks) / len(ranks) if ranks else None}
        sar_s = time.perf_counter() - t_sar

        t_eval = time.perf_counter()
        merged = MemoryStorage().wrap(merged)
        adapter.set_state(merged)
        row = evaluate("evaluate the merged model", T)
        eval_s = self.eval_s + time.perf_counter() - t_eval

        merge_record = dict(self.fisher_info) if self.fishers else {}
        diagnostics = getattr(merger, "diagnostics", None)
        if diagnostics:  # EpiMer's η = cᵀH̄⁻¹c per matrix (its module doc): the mean over matrices
            merge_record["epimer_eta_mean"] = sum(diagnostics.values()) / len(diagnostics)
        for acc, source in self.record_expert:
            record["expert_acc"].append(acc)
            record["expert_source"].append(source)
        record["acc_matrix"].append(row)
        record["sar"].append(sar_step.get("sar"))
        record["sar_current"].append(sar_step.get("current"))
        record["sar_per_task"].append(sar_step.get("per_task"))
        record["sar_skipped_layers"].append(sar_step.get("skipped_layers"))
        record["sar_rank_mean"].append(sar_step.get("rank_mean"))
        record["step_timings"].append({"fit_s": self.fit_s, "fit_s_per_expert": self.fit_s_per_expert,
                                       "fisher_s": sum(self.fisher_info["fisher_s"]),
                                       "merge_s": merge_s, "eval_s": eval_s, "sar_s": sar_s})
        record["merge_record"].append(merge_record)
        record["merger_state_bytes"].append(0)  # one merge, no state carried between steps
        record["store_steps"].append({"merge_passes": 1, "merge_peak_live_bytes": None,
                                      **MemoryStorage().step_info(merged, {})})
        record["sar_scope"] = "all_tasks" if sar is not None else None
        return merged


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@dataclasses.dataclass
class LoopCounts:
    """What one run of ``run_protocol`` (plus the runner's final validation row) does, known before
    it runs: ``cl-merge plan`` prices these, tests/test_plan.py counts them in real runs.

    ``test_evals[i]`` / ``val_evals[i]``: evaluations of task i's test / validation split. ``fits``:
    experts obtained (trained, read from the cache or opened from a file); ``merges``: merge calls
    (``merge_step`` per step, one ``merge_at_once`` under multitask); ``sar_steps``: merged bases
    built for SAR; ``sar_scores``: task updates scored against one; ``fishers``: Fisher diagonals
    asked for (multitask mergers that need them)."""

    fits: int
    merges: int
    test_evals: List[int]
    val_evals: List[int]
    sar_steps: int
    sar_scores: int
    fishers: int


def loop_counts(protocol: str, T: int, *, eval_unseen: bool, sar: bool, sar_store: bool,
                validation_scores_per_merge: int = 0, needs_fisher: bool = False,
                has_val: Optional[List[bool]] = None) -> LoopCounts:
    """The counts of the loop above for a stream of ``T`` tasks (module doc), mirrored line by line:
    row 0 evaluates θ0 on every task; each step evaluates its expert on its own task, scores
    ``validation_scores_per_merge`` candidates on the step's validation split (e.g. ``alpha_grid``),
    merges, scores SAR (every seen task with ``sar_store``) and evaluates row t (unseen tasks only with
    ``eval_unseen``); the multitask protocol evaluates row 0, each expert, then the one merged row.
    ``has_val[i]``: task i has a validation split (the final validation row skips those without).
    ``needs_fisher``: one Fisher diagonal per expert (each step's expert in the continual protocols)."""
    has_val = [True] * T if has_val is None else list(has_val)
    test = [1] * T  # row 0
    val = [1 if v else 0 for v in has_val]  # runner.final_validation
    for t in range(1, T + 1):
        test[t - 1] += 1  # the expert on its own task
    if protocol == "multitask":
        return LoopCounts(fits=T, merges=1, test_evals=[n + 1 for n in test], val_evals=val,
                          sar_steps=1 if sar else 0, sar_scores=T if sar else 0, fishers=T if needs_fisher else 0)
    for t in range(1, T + 1):
        val[t - 1] += validation_scores_per_merge
        for i in range(1, T + 1):
            if i <= t or eval_unseen:
                test[i - 1] += 1
    scores = sum(range(1, T + 1)) if sar_store else T
    return LoopCounts(fits=T, merges=T, test_evals=test, val_evals=val, sar_steps=T if sar else 0,
                      sar_scores=scores if sar else 0, fishers=T if needs_fisher else 0)
