"""Merger interface: folds a task expert into the deployed model, one tensor at a time.

A merger is a per-tensor rule plus the whole-model values it declares for a step (``plan``); the one
executor (``cl_merge.merge_engine.merge_step``) runs it over the in-memory or the on-disk parameter
store, so every merger streams by construction. To add one, implement ``merge_tensor`` (and, when the
rule needs them, ``plan`` / ``after_pass`` / ``finalize_tensor`` and the state hooks): nothing in the
core changes. See docs/ for the rule tables of the built-in mergers.

State is O(1) in the number of tasks (running sums, a running max, a norm average), never a list of
past task vectors; the documented exceptions (the continual TSV-M, ISO-CTS and EpiMer,
``strategies/continual_multitask.py``) keep per-task factors and say so. Per-tensor state (``tensor_state_keys``) is read from ``x.state`` and written to
``x.new_state``; scalar state goes through ``scalar_state`` / ``load_scalar_state``.

Notation: θ0 = ``base``, τ_t = expert − start, M_t = deployed_t − θ0.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Optional, Tuple

import torch

from .components import Component
from .merge_engine import MergeContext, MergePlan, PassView, StepInputs, TensorArgs, merge_step, split_state
from .params import StateDict
from .store import MemoryStore, MemoryWriter


@dataclasses.dataclass
class Merger(Component):
    #: the protocols this rule supports (``cl_merge.registry.PROTOCOLS``). A rule whose final state under
    #: the independent protocol is its all-at-once merge (task arithmetic, SWA, MagMax) adds "multitask":
    #: the multitask protocol then applies it expert by expert in memory (``multitask_merge.merge_at_once``).
    protocols: ClassVar[Tuple[str, ...]] = ("sequential", "independent")

    # ---- the rule --------------------------------------------------------------------------------
    def plan(self, step: int, context: MergeContext) -> MergePlan:
        """Whole-model values this step needs (default: none, a purely tensor-wise rule)."""
        return MergePlan()

    def merge_tensor(self, x: TensorArgs) -> torch.Tensor:
        """The deployed tensor ``x.name`` (or, with ``plan(...).finalize``, an intermediate one)."""
        raise NotImplementedError

    def after_pass(self, view: PassView) -> None:
        """Called once per step after ``merge_tensor`` ran on every tensor (accumulators are in
        ``view.totals``): update scalar state, choose a hyperparameter on validation data."""

    def finalize_tensor(self, x: TensorArgs, intermediate: torch.Tensor) -> torch.Tensor:
        """The deployed tensor from ``merge_tensor``'s intermediate output (finalizing plans only)."""
        raise NotImplementedError(f"{self.name}: a finalizing plan needs finalize_tensor")

    # ---- state -----------------------------------------------------------------------------------
    def tensor_state_keys(self) -> Tuple[str, ...]:
        """Names of the per-tensor state entries ``merge_tensor`` writes to ``x.new_state``."""
        return ()

    def reset_state(self) -> None:
        """Reset the scalar state before the first task."""

    def scalar_state(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_scalar_state(self, state: Dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no scalar state but a checkpoint holds some")

    # ---- whole-dict convenience (in memory; the tests and interactive use) -------------------------
    def reset(self, base: Optional[StateDict] = None) -> None:
        self._memory_state: Dict[str, torch.Tensor] = MemoryStore()
        self.reset_state()

    def merge(self, base: StateDict, previous: StateDict, expert: StateDict, start: StateDict, step: int,
              context: Optional[MergeContext] = None) -> StateDict:
        """One step over in-memory dicts, through the same executor as a protocol run."""
        state = self.__dict__.get("_memory_state", MemoryStore())
        result = merge_step(self, StepInputs(base, previous, expert, start, step), state,
                            deployed_writer=MemoryWriter, state_writer=MemoryWriter, scratch_writer=MemoryWriter,
                            context=context or MergeContext(step=step))
        self._memory_state = result.state
        return dict(result.deployed)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Per-tensor state (``key.parameter``) and scalar state (``key``) after the last ``merge``."""
        return dict(self.__dict__.get("_memory_state", {}))

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        tensors, scalars = split_state(state)
        keys = set(self.tensor_state_keys())
        unknown = sorted({k.partition(".")[0] for k in tensors} - keys)
        if unknown:
            raise ValueError(f"{self.name} keeps no per-tensor state '{unknown[0]}' but a checkpoint holds some")
        if scalars:
            self.load_scalar_state(scalars)
        self._memory_state = MemoryStore({k: v.clone() for k, v in state.items()})
