"""Per-phase seconds of a model on this machine, measured with the code the runs use, and the prices
``cl-merge plan`` puts on a grid's counts (``cl_merge.grid.cost``).

Two ways to measure, chosen per model:

* ``measure_benchmark``: the benchmark's own adapter and tasks (built offline: the mini suite). A few
  real ``learner.fit`` calls of two lengths (fixed + per-step cost: EWC's importance pass and ER's
  buffer land in the fixed part), real evaluation passes, one real ``merge_step`` of every continual
  merger at step 2, ``merge_at_once`` of every multitask merger with 2 and 3 experts (a + b·T), one
  SAR step scoring 1 and 3 tasks, and the Fisher diagonal of one expert.
* ``measure_architecture``: a model whose weights or data are not here (vision20's open_clip
  backbones): the real architecture with random weights (``open_clip.create_model(pretrained=None)``),
  a measured fwd+bwd+AdamW step and a forward pass of the image tower on random images at a small
  batch, scaled linearly to the run's batch (assumed), real merges and SAR on the tower's own tensor
  shapes with synthetic task vectors; what depends on the learner (SAM's second pass, EWC's importance
  pass per training sample, the Fisher per sample) is taken from a mini measurement, scaled by the
  ratio of the two models' measured per-sample step cost (assumed). Each figure records which it is.

A calibration file (JSON or TOML) holds ``{"machine": ..., "models": {KEY: PhaseCosts}}``, KEY being
``grid.cost.calibration_key`` (e.g. ``vision20:open_clip:ViT-B-32/openai``).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclasses.dataclass
class PhaseCosts:
    """Seconds per unit of each phase for one model (module doc). ``fit[learner]`` = {step_s (per
    optimizer step at ``batch``), batch, fixed_s (per fit), fixed_per_train_sample_s}; ``merge_s``:
    continual merger -> one merge step; ``merge_once_s``: multitask merger -> [a, b] (a + b·T);
    ``notes``: phase -> "measured ..." / "assumed ...", shown by the plan."""

    fit: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)
    eval_sample_s: Optional[float] = None
    eval_pass_s: Optional[float] = None  # per evaluation pass, where split sizes are unknown
    merge_s: Dict[str, float] = dataclasses.field(default_factory=dict)
    merge_once_s: Dict[str, List[float]] = dataclasses.field(default_factory=dict)
    sar_step_s: Optional[float] = None
    sar_score_s: Optional[float] = None
    fisher_sample_s: Optional[float] = None
    setup_s: Optional[float] = None
    checkpoint_s: Optional[float] = None  # one step checkpoint (the deployed state) written
    cache_put_s: Optional[float] = None  # one expert written to the expert cache
    merge_flops: Optional[float] = None  # ``svd_flops`` of the shapes the merge/SAR costs were measured on
    notes: Dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], where: str) -> "PhaseCosts":
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - fields)
        if bad:
            raise UserError(f"{where}: unknown phase '{bad[0]}'; known: {', '.join(sorted(fields))}")
        return cls(**data)


@dataclasses.dataclass
class Calibration:
    machine: Dict[str, Any]
    models: Dict[str, PhaseCosts]


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    info = {"device": device, "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "clock": "cpu (process time)" if CLOCK is time.process_time else "wall",
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(0)
    else:
        info["device_name"] = platform.processor() or "cpu"
    return info


def load_calibration(path: Path) -> Calibration:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no such calibration file: {path}; write one with --save-calibration") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"calibration file {path} is unreadable ({exc.__class__.__name__})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"calibration file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'} "
                        f"({exc}); fix it or write a new one with --save-calibration") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise UserError(f"calibration file {path} needs a 'models' table of per-model phase costs "
                        "(see docs/grids.md, 'Cost plan')")
    models = {k: PhaseCosts.from_dict(v, f"calibration file {path}, model {k}") for k, v in data["models"].items()}
    return Calibration(machine=dict(data.get("machine", {})), models=models)


def save_calibration(calibration: Calibration, path: Path) -> None:
    from .io import write_text_atomic

    data = {"machine": calibration.machine,
            "models": {k: dataclasses.asdict(v) for k, v in calibration.models.items()}}
    write_text_atomic(Path(path), json.dumps(data, indent=1, sort_keys=True) + "\n")


def merge_into(base: Optional[Calibration], extra: Calibration) -> Calibration:
    if base is None:
        return extra
    # the machine of what was just measured; the given file's own figures keep their notes
    machine = dict(extra.machine, merged_with=base.machine) if extra.models else base.machine
    return Calibration(machine=machine, models={**extra.models, **base.models})


_LOG = lambda text: None  # noqa: E731  (progress lines while measuring; set by measure_for)


# ---- timing helpers ----------------------------------------------------------------------------------
#: the clock every measurement reads: wall time by default; ``time.process_time`` measures this process's
#: own CPU time, which on a shared single-threaded CPU is the time a dedicated one would take
CLOCK = time.perf_counter


def _timed(fn) -> Tuple[float, Any]:
    t0 = CLOCK()
    value = fn()
    return CLOCK() - t0, value


def _task_vector_like(state: Dict[str, torch.Tensor], gen: torch.Generator, scale: float = 1e-3):
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) if v.is_floating_point()
            else v.clone() for k, v in state.items()}


def _merge_costs(theta0: Dict[str, torch.Tensor], mergers: Dict[str, Any], multitask: Dict[str, Any],
                 notes: Dict[str, str], what: str) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    """One continual merge step (step 2, after a step 1) per merger; multitask merges of 2 and 3
    experts (a + b·T), all on ``theta0``'s shapes with synthetic task vectors. The continual variants
    of the multi-task mergers see a 3-task run (their per-task rank is r/T; their step cost grows with t,
    which the step-2 figure does not follow)."""
    from .merge_engine import MergeContext, StepInputs, merge_step
    from .multitask_merge import merge_at_once
    from .store import MemoryStorage, MemoryStore

    gen = torch.Generator().manual_seed(0)
    experts = [MemoryStore(_task_vector_like(theta0, gen)) for _ in range(3)]
    base = MemoryStore(dict(theta0))
    storage = MemoryStorage()
    merge_s: Dict[str, float] = {}
    for name, merger in mergers.items():
        merger.reset()

        def touch(state):  # a validation scorer stand-in: builds the candidate (its evaluation is priced apart)
            return float(sum(float(state[n].flatten()[0]) for n in state))

        def fisher_of(expert):  # a positive stand-in diagonal for mergers that need one (continual EpiMer)
            return {k: v.abs() + 1e-6 for k, v in expert.items()} if getattr(merger, "needs_fisher", False) else None

        state, previous = storage.empty_state(), base
        for step in (1, 2):
            dw, sw, scw, release = storage.writers(step)
            seconds, result = _timed(lambda: merge_step(
                merger, StepInputs(base, previous, experts[step - 1], base, step), state, deployed_writer=dw,
                state_writer=sw, scratch_writer=scw, release=release,
                context=MergeContext(step=step, validation_score=touch, tasks=3, fisher=fisher_of(experts[step - 1]))))
            previous, state = result.deployed, result.state
        merge_s[name] = seconds
        _LOG(f"  merge {name}: {seconds:.2f} s per step")
    notes["merge"] = f"measured: merge_step at step 2 of each continual merger on {what}"
    once: Dict[str, List[float]] = {}
    for name, merger in multitask.items():
        needs_fisher = getattr(merger, "needs_fisher", False)
        fishers = [{k: v.abs() + 1e-6 for k, v in e.items()} for e in experts] if needs_fisher else None
        times = []
        for T in (2, 3):
            times.append(_timed(lambda: merge_at_once(merger, dict(theta0), [dict(e) for e in experts[:T]],
                                                       fishers=fishers[:T] if fishers else None))[0])
        b = max(times[1] - times[0], 0.0)
        once[name] = [max(times[0] - 2 * b, 0.0), b]
        _LOG(f"  multitask merge {name}: {times[0]:.2f} s (2 experts), {times[1]:.2f} s (3)")
    if multitask:
        notes["merge"] += "; merge_at_once of each multitask merger with 2 and 3 experts (a + b·T)"
    return merge_s, once


def _sar_costs(theta0: Dict[str, torch.Tensor], settings, notes: Dict[str, str], what: str) -> Tuple[float, float]:
    """One SAR step scoring 1 task, then one scoring 3 (the stored updates of steps 1 and 2)."""
    from .sar import SARMeter

    gen = torch.Generator().manual_seed(1)
    experts = [_task_vector_like(theta0, gen) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        meter = SARMeter(settings.sar_energy, Path(tmp) / "sar", qkv=settings.sar_qkv)
        (Path(tmp) / "sar").mkdir()
        t1 = _timed(lambda: meter.step(1, theta0, theta0, experts[0], experts[0]))[0]
        meter.step(2, theta0, theta0, experts[1], experts[1])
        t3 = _timed(lambda: meter.step(3, theta0, theta0, experts[2], experts[2]))[0]
    score = max((t3 - t1) / 2, 0.0)
    notes["sar"] = f"measured: SARMeter.step scoring 1 and 3 tasks on {what}"
    return max(t1 - score, 0.0), score


def _write_costs(theta0: Dict[str, torch.Tensor], notes: Dict[str, str], what: str) -> Tuple[float, float]:
    """(a step checkpoint of the deployed state, one expert-cache entry) written by the runs' own code."""
    from .expert_cache import ExpertCache
    from .step_checkpoint import Checkpointer

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "ckpt", "calibration")
        record = {"acc_matrix": [[0.0]]}
        checkpoint_s = min(_timed(lambda step=step: ckpt.save(step, record, {"deployed": theta0}))[0] for step in (1, 2))
        cache = ExpertCache(Path(tmp) / "experts")
        put_s = _timed(lambda: cache.put("calibration", dict(theta0)))[0]
        cache.release()
    notes["checkpoint"] = f"measured: Checkpointer.save and ExpertCache.put of {what}"
    return checkpoint_s, put_s


def _components(configs: Sequence, kind: str) -> Dict[str, Any]:
    """One instance per learner / merger name among ``configs`` (the first config's settings)."""
    from .config import instantiate

    out: Dict[str, Any] = {}
    for c in configs:
        name = c.learner if kind == "learner" else c.merger
        if name in out:
            continue
        _, learner, merger, settings = instantiate(c)
        if kind == "learner":
            out[name] = (learner, c)
        elif kind == "merger":
            out[name] = (merger, c)
    return out


# ---- the benchmark's own model and tasks ------------------------------------------------------------
def measure_benchmark(configs: Sequence, steps: Tuple[int, int] = (4, 12)) -> PhaseCosts:
    """Phase costs of the model of ``configs`` (all of one calibration key) with the benchmark's own
    adapter and first two tasks (module doc)."""
    from .config import instantiate
    from .learner import FitContext
    from .protocol import fisher_settings

    benchmark, _, _, settings = instantiate(configs[0])
    notes: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def build():
            adapter = benchmark.build_model(cache_dir=Path(tmp), device="cpu", eval_batch_size=settings.eval_batch_size)
            stream = benchmark.build_stream(order=configs[0].order, seed=0)
            for task in stream.tasks:
                adapter.prepare(task)
            return adapter, stream

        build()  # the first build of a process draws the tasks and writes the heads' cache
        setup_s, (adapter, stream) = _timed(build)
        tasks = stream.tasks[:2]
        notes["setup"] = ("measured: build_model + build_stream + every task's head from the cache, as each run "
                          "of a grid process does (the process's first data draw not included)")
        theta0 = adapter.get_state()

        fit: Dict[str, Dict[str, float]] = {}
        for name, (learner, config) in _components(configs, "learner").items():
            if learner.opens_experts or learner.step_budget() == 0:
                continue
            times = []
            for k in steps:
                from .registry import LEARNERS

                fresh = LEARNERS.get(name)(**{**config.learner_params, "steps": k})
                ctx = lambda task, step: FitContext(adapter=adapter, task=task, step=step, seed=step)  # noqa: E731
                fresh.fit(dict(theta0), ctx(tasks[0], 1))  # stateful learners: a buffer / importances at step 2
                times.append(_timed(lambda: fresh.fit(dict(theta0), ctx(tasks[1], 2)))[0])
            step_s = max((times[1] - times[0]) / (steps[1] - steps[0]), 1e-9)
            _LOG(f"  fit {name}: {step_s:.3f} s per step, {max(times[0] - steps[0] * step_s, 0.0):.2f} s per fit")
            fit[name] = {"step_s": step_s, "batch": float(learner.batch_size),
                         "fixed_s": max(times[0] - steps[0] * step_s, 0.0), "fixed_per_train_sample_s": 0.0}
        notes["fit"] = (f"measured: learner.fit of {steps[0]} and {steps[1]} steps at step 2 (after one fit), "
                        "fixed + per-step")
        adapter.set_state(theta0)
        evals = []
        for task in tasks:
            evals.append(_timed(lambda: adapter.evaluate(task))[0] / len(task.test))
        eval_sample_s = sorted(evals)[len(evals) // 2] if len(evals) % 2 else sum(evals) / len(evals)
        notes["eval"] = f"measured: adapter.evaluate on the test split of {len(tasks)} tasks, per sample"

        mergers = {n: m for n, (m, c) in _components(configs, "merger").items() if c.protocol != "multitask"}
        multitask = {n: m for n, (m, c) in _components([c for c in configs if c.protocol == "multitask"],
                                                        "merger").items()}
        merge_s, once = _merge_costs(theta0, mergers, multitask, notes, "the model's own parameters")
        sar_step_s, sar_score_s = _sar_costs(theta0, settings, notes, "the model's own parameters")
        checkpoint_s, cache_put_s = _write_costs(theta0, notes, "the model's own parameters")
        # always measured (cheap here): the architecture path derives its Fisher price from it
        from .fisher import fisher_diagonal

        fisher_mergers = [m for m, _ in _components(configs, "merger").values() if getattr(m, "needs_fisher", False)]
        seconds, est = _timed(lambda: fisher_diagonal(
            adapter, tasks[0], params=theta0,
            settings=fisher_settings(fisher_mergers[0] if fisher_mergers else object(), 0)))
        fisher_sample_s = seconds / max(est.samples, 1)
        notes["fisher"] = "measured: fisher_diagonal of one expert, per sample"
    return PhaseCosts(fit=fit, eval_sample_s=eval_sample_s, merge_s=merge_s, merge_once_s=once,
                      sar_step_s=sar_step_s, sar_score_s=sar_score_s, fisher_sample_s=fisher_sample_s,
                      setup_s=setup_s, checkpoint_s=checkpoint_s, cache_put_s=cache_put_s, notes=notes)


# ---- an architecture with random weights (vision20's open_clip backbones) -------------------------
def _clip_tower_costs(model_name: str, batch: int, repeats: int = 2) -> Tuple[float, float, float, Dict]:
    """(fwd+bwd+AdamW seconds per sample, forward seconds per sample, build seconds, tower state) of
    open_clip ``model_name``'s image tower with random weights on random images."""
    import open_clip

    build_s, model = _timed(lambda: open_clip.create_model(model_name, pretrained=None))
    visual = model.visual
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    head = torch.randn(model.visual.output_dim, 10, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    params = [p for p in visual.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def train_step():
        opt.zero_grad(set_to_none=True)
        feats = visual(images)
        logits = torch.nn.functional.normalize(feats, dim=-1) @ head
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()

    @torch.no_grad()
    def forward():
        visual(images)

    train_step()  # warm-up (allocations, Adam state)
    train = min(_timed(train_step)[0] for _ in range(repeats)) / batch
    forward()
    fwd = min(_timed(forward)[0] for _ in range(repeats)) / batch
    state = {k: p.detach().clone() for k, p in visual.named_parameters()}
    opt.zero_grad(set_to_none=True)  # frees the gradients; Adam's state goes with the function's scope
    return train, fwd, build_s, state


def svd_flops(state: Dict[str, torch.Tensor]) -> float:
    """Σ m·n·min(m, n) over the 2-D tensors: what a per-matrix SVD/eigh merge scales with."""
    return float(sum(v.shape[0] * v.shape[1] * min(v.shape) for v in state.values() if v.ndim == 2))


def measure_architecture(configs: Sequence, mini: PhaseCosts, batch: int = 4,
                         shapes_from: Optional[Tuple[str, Dict[str, float], Dict[str, List[float]], float, float,
                                                         Dict[str, torch.Tensor]]] = None) -> Tuple[PhaseCosts, Any]:
    """Phase costs of a vision20 open_clip backbone that is not on this machine (module doc). ``mini``:
    a ``measure_benchmark`` result for the mini suite with the same learners (the learner-specific
    ratios). ``shapes_from``: merge and SAR costs measured on another backbone's tower, scaled here by
    ``svd_flops`` (assumed), instead of measuring them again. Returns (costs, what ``shapes_from``
    takes, for the next backbone)."""
    from .config import instantiate

    benchmark, _, _, settings = instantiate(configs[0])
    name = benchmark.model_name
    notes: Dict[str, str] = {}
    train_s, fwd_s, build_s, state = _clip_tower_costs(name, batch)
    _LOG(f"  {name}: fwd+bwd+AdamW {train_s:.3f} s per sample, forward {fwd_s:.4f} s per sample")
    notes["fit"] = (f"measured: {name} image tower (random weights) fwd+bwd+AdamW at batch {batch}, per sample, "
                    "scaled linearly to the run's batch (assumed); other learners than adam by their mini cost "
                    "ratio to adam, EWC-like fixed costs per training sample likewise (assumed)")
    notes["eval"] = f"measured: {name} image tower forward at batch {batch}, per sample (data loading assumed hidden)"
    notes["setup"] = f"measured: building {name} with random weights (downloads and dataset preparation not included)"
    adam = mini.fit.get("adam")
    if adam is None:
        raise UserError("the architecture calibration needs the mini suite's adam cost (a grid with adam experts)")
    adam_sample = adam["step_s"] / adam["batch"]
    ratio = train_s / adam_sample  # this model's per-sample fwd+bwd cost over the mini model's
    fit: Dict[str, Dict[str, float]] = {}
    for lname, (learner, config) in _components(configs, "learner").items():
        ref = mini.fit.get(lname)
        if ref is None or learner.opens_experts:
            continue
        learner_ratio = (ref["step_s"] / ref["batch"]) / adam_sample
        mini_train = _mini_train_size()
        extra_fixed = max(ref["fixed_s"] - adam["fixed_s"], 0.0) / mini_train  # e.g. EWC's importance pass
        fit[lname] = {"step_s": train_s * learner_ratio * batch, "batch": float(batch), "fixed_s": 0.0,
                      "fixed_per_train_sample_s": extra_fixed * ratio}
    if shapes_from is None:
        mergers = {n: m for n, (m, c) in _components(configs, "merger").items() if c.protocol != "multitask"}
        multitask = {n: m for n, (m, c) in _components([c for c in configs if c.protocol == "multitask"],
                                                        "merger").items()}
        merge_s, once = _merge_costs(state, mergers, multitask, notes, f"{name}'s tower shapes (synthetic updates)")
        sar_step_s, sar_score_s = _sar_costs(state, settings, notes, f"{name}'s tower shapes")
        shapes_from = (name, merge_s, once, sar_step_s, sar_score_s, svd_flops(state))
    else:
        ref_name, merge_s0, once0, sar0, score0, flops0 = shapes_from
        scale = svd_flops(state) / flops0
        merge_s = {k: v * scale for k, v in merge_s0.items()}
        once = {k: [a * scale, b * scale] for k, (a, b) in once0.items()}
        sar_step_s, sar_score_s = sar0 * scale, score0 * scale
        notes["merge"] = (f"assumed: measured on {ref_name}'s tower shapes, scaled by the per-matrix SVD flop "
                          f"count (×{scale:.2f})")
        notes["sar"] = notes["merge"]
    fisher = mini.fisher_sample_s * ratio if mini.fisher_sample_s is not None else None
    notes["fisher"] = "assumed: the mini Fisher per sample × the per-sample fwd+bwd cost ratio"
    checkpoint_s, cache_put_s = _write_costs(state, notes, f"{name}'s tower state")
    flops = svd_flops(state)
    del state
    return PhaseCosts(fit=fit, eval_sample_s=fwd_s, merge_s=merge_s, merge_once_s=once, sar_step_s=sar_step_s,
                      sar_score_s=sar_score_s, fisher_sample_s=fisher, setup_s=build_s, merge_flops=flops,
                      checkpoint_s=checkpoint_s, cache_put_s=cache_put_s,
                      notes=notes), shapes_from


def _mini_train_size() -> int:
    from .registry import BENCHMARKS

    return BENCHMARKS.get("mini")().n_train


# ---- pricing --------------------------------------------------------------------------------------------
def price(run, costs: Optional[PhaseCosts], sizes_train: Optional[int] = None) -> Dict[str, Optional[float]]:
    """Seconds per phase of one ``grid.cost.RunCost`` under ``costs`` (None where a price is missing)."""
    if costs is None:
        return {p: None for p in ("setup", "fit", "eval", "merge", "sar", "fisher", "checkpoint")}
    config = run.config
    out: Dict[str, Optional[float]] = {"setup": costs.setup_s}
    fit = costs.fit.get(config.learner)
    if run.fits_trained == 0:
        out["fit"] = 0.0
    elif fit is None:
        out["fit"] = None
    else:
        per_step = fit["step_s"] * (run.batch_size or fit["batch"]) / fit["batch"]
        fixed = fit.get("fixed_s", 0.0) + fit.get("fixed_per_train_sample_s", 0.0) * (getattr(run, "train_size", 0) or 0)
        out["fit"] = run.fits_trained * (fixed + per_step * run.steps_per_fit)
    if run.test_samples is not None and costs.eval_sample_s is not None:
        out["eval"] = (run.test_samples + run.val_samples) * costs.eval_sample_s
    elif costs.eval_pass_s is not None:
        out["eval"] = (run.test_evals + run.val_evals) * costs.eval_pass_s
    else:
        out["eval"] = None
    if run.merges == 0:
        out["merge"] = 0.0
    elif config.protocol == "multitask":
        ab = costs.merge_once_s.get(config.merger)
        out["merge"] = None if ab is None else ab[0] + ab[1] * run.T
    else:
        m = costs.merge_s.get(config.merger)
        out["merge"] = None if m is None else m * run.merges
    if run.sar_steps == 0:
        out["sar"] = 0.0
    elif costs.sar_step_s is None or costs.sar_score_s is None:
        out["sar"] = None
    else:
        out["sar"] = run.sar_steps * costs.sar_step_s + run.sar_scores * costs.sar_score_s
    if run.fishers == 0:
        out["fisher"] = 0.0
    elif costs.fisher_sample_s is None or run.fisher_samples is None:
        out["fisher"] = None
    else:
        out["fisher"] = run.fisher_samples * costs.fisher_sample_s
    # a step checkpoint after every continual merge; each expert a shared run trains goes into the cache
    steps = run.merges if config.protocol != "multitask" else 0
    puts = run.fits_trained if run.shared else 0
    if (steps and costs.checkpoint_s is None) or (puts and costs.cache_put_s is None):
        out["checkpoint"] = None
    else:
        out["checkpoint"] = steps * (costs.checkpoint_s or 0.0) + puts * (costs.cache_put_s or 0.0)
    return out


def measurable(benchmark_name: str) -> bool:
    """Models this machine can calibrate offline: the mini suite (its own adapter) and vision20's open_clip
    backbones (random weights); others need a calibration file."""
    return benchmark_name in ("mini", "vision20")


def _mini_reference(configs: Sequence) -> List:
    """Mini-suite configs with the learners of ``configs`` (their settings except the step budget), for
    the learner-specific cost ratios of ``measure_architecture``."""
    from .config import resolve

    out, seen = [], set()
    for c in configs:
        if c.learner in seen:
            continue
        seen.add(c.learner)
        keep = [f"learner.{k}={v}" for k, v in c.learner_params.items()
                if k not in ("steps", "batch_size", "lr") and isinstance(v, (int, float, str)) and not isinstance(v, bool)]
        try:
            out.append(resolve("mini", learner=c.learner, merger="task_arithmetic", protocol="sequential", overrides=keep))
        except (UserError, ValueError, TypeError):
            out.append(resolve("mini", learner=c.learner, merger="task_arithmetic", protocol="sequential"))
    return out


def measure_for(configs_by_key: Dict[str, Sequence], log=lambda text: None, batch: int = 4,
                existing: Optional[Calibration] = None) -> Calibration:
    """Measure every calibration key of ``configs_by_key`` that this machine can (``measurable``).
    vision20 backbones measure merges and SAR once, on the smallest (ViT-B-32 first) or on one already
    in ``existing``, and scale them to the others (``measure_architecture``)."""
    global _LOG
    _LOG = log
    models: Dict[str, PhaseCosts] = {}
    mini_ref: Optional[PhaseCosts] = None
    shapes = None
    for key, costs in (existing.models.items() if existing else ()):
        if key.startswith("vision20:") and costs.merge_flops and costs.sar_step_s is not None:
            shapes = (key.split(":", 2)[-1], costs.merge_s, costs.merge_once_s, costs.sar_step_s, costs.sar_score_s,
                      costs.merge_flops)
            break
    rank = lambda key: (key.startswith("vision20"), "B-32" not in key, key)  # noqa: E731
    for key, configs in sorted(configs_by_key.items(), key=lambda kv: rank(kv[0])):
        name = configs[0].benchmark
        if not measurable(name):
            continue
        log(f"calibrating {key} on this machine ...")
        if name == "mini":
            models[key] = measure_benchmark(configs)
            continue
        all_learners = [c for cs in configs_by_key.values() for c in cs if c.benchmark == "vision20"]
        if mini_ref is None:
            mini_ref = measure_benchmark(_mini_reference(all_learners))
        large = "L-14" in key or "H-14" in key or "g-14" in key  # fewer images: the same per-sample figure, sooner
        models[key], shapes = measure_architecture(configs, mini_ref, batch=max(1, batch // 2) if large else batch,
                                                   shapes_from=shapes)
    return Calibration(machine=machine_info(), models=models)
