"""The one merge executor: runs any merger's per-tensor rule over a parameter store.

A merger (``cl_merge.merger.Merger``) is written once, in the shape mergekit uses:

* a per-tensor rule ``merge_tensor(x) -> Tensor``: ``x`` (``TensorArgs``) is one parameter's view of
  the step: its name, θ0, previous, expert and start tensors (read lazily from their stores), τ,
  the parameter's stored state and the step's whole-model values;
* a ``MergePlan`` per step declaring what the rule needs beyond one tensor: ``reductions`` computed
  before the rule (TIES' global trim thresholds and majority sign), ``accumulators`` gathered while
  it runs (OPCM's norms), and whether its outputs are only intermediate (``finalize``: OPCM's
  θ0 + S_t/λ_t needs λ_t, known only once every tensor was seen; isotropic's α chosen on validation).

``merge_step`` executes a plan the same way over the in-memory and the on-disk store:

    for each reduction: its passes over every tensor           -> x.reduced[key]
    pass A: y = merge_tensor(x) for every tensor, written out  (+ accumulators, + per-tensor state)
    merger.after_pass(view)                                    (scalars: OPCM's λ_t, isotropic's α)
    pass B (finalize only): deployed = finalize_tensor(x, y)   (y read back from the scratch store)

So at any time a step holds a few tensors of one parameter (plus the reductions' O(1) buffers), and
every merger streams by construction. The merger's O(model) state (C-TA's running sum, MagMax's
running max) is per-tensor: ``x.state`` is read from the previous state store and ``x.new_state``
goes to the new one under ``"<key>.<parameter>"``; scalar state (OPCM's λ, norm sum, count) is
stored under its plain key.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .errors import UserError
from .reductions import Reduction, Total, run_reduction

Scorer = Callable[[Mapping[str, torch.Tensor]], float]


@dataclasses.dataclass
class MergeContext:
    """What a merge step may use beyond the tensors, and where it reports.

    ``validation_score(state) -> float`` scores a candidate deployed state (a name -> tensor mapping,
    possibly lazy) on the current task's validation split, never its test split; None where the run
    offers no validation data. ``record`` receives the merger's per-step record (e.g. the α it chose);
    the protocol loop writes it into the results. ``tasks`` is the run's number of tasks T (the
    continual variants of the multi-task mergers fix each task's rank from it); ``fisher`` the current
    expert's Fisher diagonal (a name -> tensor mapping) for mergers that declare ``needs_fisher``."""

    step: int = 0
    validation_score: Optional[Scorer] = None
    record: Dict[str, Any] = dataclasses.field(default_factory=dict)
    tasks: Optional[int] = None
    fisher: Optional[Mapping[str, torch.Tensor]] = None

    def score(self, state: Mapping[str, torch.Tensor], needed_by: str = "the merger") -> float:
        if self.validation_score is None:
            raise UserError(f"{needed_by} needs validation data, but this run offers no validation scorer; "
                            "leave merger.alpha_grid empty and set merger.alpha")
        return float(self.validation_score(state))


@dataclasses.dataclass
class MergePlan:
    """What one step of a merger needs beyond its per-tensor rule (module doc)."""

    reductions: Sequence[Reduction] = ()
    accumulators: Sequence[Total] = ()
    finalize: bool = False


@dataclasses.dataclass
class StepInputs:
    """The four states of one merge step, each a name -> tensor mapping (a parameter store)."""

    base: Mapping[str, torch.Tensor]
    previous: Mapping[str, torch.Tensor]
    expert: Mapping[str, torch.Tensor]
    start: Mapping[str, torch.Tensor]
    step: int


class TensorArgs:
    """One parameter's view of a merge step. Inputs are read from their stores on first use and are
    shared with them (in memory): a rule must not modify them, nor ``tau``, in place."""

    def __init__(self, name: str, inputs: StepInputs, state: Mapping[str, torch.Tensor],
                 reduced: Dict[str, Any], context: MergeContext):
        self.name = name
        self.step = inputs.step
        self._inputs = inputs
        self.state = state
        self.new_state: Dict[str, torch.Tensor] = {}
        self.reduced = reduced
        self.context = context
        self._cache: Dict[str, torch.Tensor] = {}

    def _read(self, which: str) -> torch.Tensor:
        t = self._cache.get(which)
        if t is None:
            store = getattr(self._inputs, which)
            if which == "start" and store is self._inputs.base:
                return self.base
            if which == "previous" and store is self._inputs.base:
                return self.base
            t = self._cache[which] = store[self.name]
        return t

    @property
    def base(self) -> torch.Tensor:
        return self._read("base")

    @property
    def previous(self) -> torch.Tensor:
        return self._read("previous")

    @property
    def expert(self) -> torch.Tensor:
        return self._read("expert")

    @property
    def start(self) -> torch.Tensor:
        return self._read("start")

    @property
    def tau(self) -> torch.Tensor:
        """τ = expert − start (computed once per view)."""
        t = self._cache.get("tau")
        if t is None:
            t = self._cache["tau"] = torch.sub(self.expert, self.start)
        return t


class TensorState(Mapping):
    """One parameter's stored state (``key -> tensor``), read from the state store on lookup."""

    def __init__(self, store: Mapping[str, torch.Tensor], name: str, keys: Sequence[str]):
        self._store, self._name = store, name
        self._keys = [k for k in keys if state_key(k, name) in store]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._store[state_key(key, self._name)]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclasses.dataclass
class PassView:
    """What ``Merger.after_pass`` sees: the step's inputs, the accumulators' totals and, for a
    finalizing plan, the rule's outputs (``intermediate``, read lazily)."""

    inputs: StepInputs
    totals: Dict[str, Any]
    intermediate: Optional[Mapping[str, torch.Tensor]]
    context: MergeContext


class StoreWriter:
    """Where a step's outputs go: ``add`` one tensor at a time, then ``commit`` (the store appears
    whole, or not at all) or ``abort``. Implemented by ``cl_merge.store``."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def commit(self) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class StepResult:
    deployed: Mapping[str, torch.Tensor]
    state: Mapping[str, torch.Tensor]
    passes: int
    merge_s: float


def state_key(key: str, name: str) -> str:
    return f"{key}.{name}"


def split_state(state: Mapping[str, torch.Tensor]):
    """(per-tensor entries ``key.name``, scalar entries ``key``) of a merger's state."""
    tensors = {k: state[k] for k in state if "." in k}
    scalars = {k: state[k] for k in state if "." not in k}
    return tensors, scalars


def merge_step(merger, inputs: StepInputs, state: Mapping[str, torch.Tensor], *,
               deployed_writer: Callable[[], StoreWriter], state_writer: Callable[[], StoreWriter],
               scratch_writer: Callable[[], StoreWriter], release: Callable[[Any], None] = lambda store: None,
               context: Optional[MergeContext] = None, names: Optional[List[str]] = None) -> StepResult:
    """Run one step of ``merger`` over stores (module doc). ``state`` is the previous state store;
    the writers make the new deployed store, the new state store and a scratch store for a finalizing
    plan's intermediate outputs (``release`` disposes of it afterwards)."""
    t0 = time.perf_counter()
    context = context or MergeContext(step=inputs.step)
    names = list(inputs.base) if names is None else names
    specs = {n: spec_of(inputs.base, n) for n in names}
    keys = tuple(merger.tensor_state_keys())
    plan = merger.plan(inputs.step, context)
    reduced: Dict[str, Any] = {}

    def view(n: str) -> TensorArgs:
        return TensorArgs(n, inputs, TensorState(state, n, keys), reduced, context)

    passes = 0
    for reduction in plan.reductions:
        reduced[reduction.key] = run_reduction(reduction, specs, lambda: (view(n) for n in names))
        passes += reduction.passes
    for acc in plan.accumulators:
        acc.begin(specs)

    out = (scratch_writer if plan.finalize else deployed_writer)()
    new_state = state_writer()
    try:
        for n in names:
            x = view(n)
            y = merger.merge_tensor(x)
            for acc in plan.accumulators:
                acc.visit(0, x, y)
            out.add(n, y)
            for k, v in x.new_state.items():
                if k not in keys:
                    raise ValueError(f"merger {merger.name} wrote state '{k}' it does not declare "
                                     f"(tensor_state_keys: {keys})")
                new_state.add(state_key(k, n), v)
            del x, y
        first = out.commit()
    except BaseException:
        out.abort()
        new_state.abort()
        raise
    passes += 1
    totals = {acc.key: acc.result() for acc in plan.accumulators}
    try:
        merger.after_pass(PassView(inputs, totals, first if plan.finalize else None, context))
        if plan.finalize:
            final = deployed_writer()
            try:
                for n in names:
                    final.add(n, merger.finalize_tensor(view(n), first[n]))
                deployed = final.commit()
            except BaseException:
                final.abort()
                raise
            passes += 1
            release(first)
        else:
            deployed = first
        for k, v in merger.scalar_state().items():
            new_state.add(k, v)
        committed_state = new_state.commit()
    except BaseException:
        new_state.abort()
        raise
    return StepResult(deployed, committed_state, passes, time.perf_counter() - t0)


def spec_of(store: Mapping[str, torch.Tensor], name: str):
    """(dtype, shape) of a store's tensor without reading it; a plain dict (``Merger.merge``) is read."""
    if isinstance(store, dict) and not hasattr(store, "spec"):
        t = store[name]
        return t.dtype, tuple(t.shape)
    return store.spec(name)


def logical_bytes(store) -> int:
    """Bytes of a store's tensors (numel × element size, read from their specs): the merger state size the
    results record per step, the same on the memory and the on-disk store (a file adds its header)."""
    total = 0
    for name in store:
        dtype, shape = spec_of(store, name)
        total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return total
