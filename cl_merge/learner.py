"""Learner interface: turns a start point into a task expert.

``GradientLearner.fit`` is the one training loop; learners differ by their optimizer (which may run
several forward/backward passes per step through the closure, as sharpness-aware methods do) and by
hooks whose names say when they fire (Avalanche's convention):

    before_training_exp -> [per step: closure(before_backward -> backward -> after_backward)
                            -> optimizer step -> after_update] -> after_training_exp
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, Literal, Optional

import torch

from .components import Component, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from .divergence import check_iteration
from .models.base import ModelAdapter
from .params import StateDict
from .task import Task


@dataclasses.dataclass
class FitContext:
    """What one ``fit`` call knows. ``step`` is the position in the stream (1-based)."""

    adapter: ModelAdapter
    task: Task
    step: int
    seed: int
    params: Dict[str, torch.nn.Parameter] = dataclasses.field(default_factory=dict)
    optimizer: Optional[torch.optim.Optimizer] = None
    iteration: int = 0
    on_iteration: Any = None  # progress callback(iteration, loss)


@dataclasses.dataclass
class Learner(Component):
    """Base for all learners. Subclasses that keep state across tasks (EWC's Fisher, ER's buffer)
    set ``stateful = True`` and implement ``state_dict``/``load_state_dict`` for checkpoints."""

    stateful: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True  # independent-protocol experts may be stored in the expert cache
    expert_source: ClassVar[str] = "trained"  # recorded per step in the results' expert_source
    opens_experts: ClassVar[bool] = False  # True: experts come from files (``expert_path``), no training

    def fit(self, start: StateDict, ctx: FitContext) -> StateDict:  # pragma: no cover - interface
        raise NotImplementedError

    def step_budget(self) -> int:
        """Optimizer steps one ``fit`` takes (the loop's progress bar); 0 when it does not train."""
        return 0

    def expert_path(self, task: Task):
        """The expert checkpoint of ``task`` (learners with ``opens_experts``), read tensor by tensor
        by the on-disk parameter store."""
        raise NotImplementedError(f"{self.name} trains its experts; it has no expert files")

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        return None


@dataclasses.dataclass
class GradientLearner(Learner):
    """Fine-tunes the adapter's trainable parameters for ``steps`` batches.

    ``steps``, ``batch_size`` and ``lr`` default to None and are filled from the benchmark's training
    defaults (e.g. the mini suite's), so every learner is run with the same budget.
    """

    steps: Optional[PositiveInt] = None
    batch_size: Optional[PositiveInt] = None
    lr: Optional[PositiveFloat] = None
    weight_decay: NonNegativeFloat = 0.01
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 0

    def step_budget(self) -> int:
        return self.steps or 0

    # ---- hooks --------------------------------------------------------------------------------
    def before_training_exp(self, ctx: FitContext) -> None: ...

    def before_backward(self, ctx: FitContext, loss: torch.Tensor, batch) -> torch.Tensor:
        return loss

    def after_backward(self, ctx: FitContext) -> None: ...

    def after_update(self, ctx: FitContext) -> None: ...

    def after_training_exp(self, ctx: FitContext) -> None: ...

    # ---- the optimizer ------------------------------------------------------------------------
    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def lr_factor(self, iteration: int) -> float:
        if iteration < self.warmup_steps:
            return (iteration + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(self.steps - self.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (iteration - self.warmup_steps) / span))

    def _check_budget(self) -> None:
        for key in ("steps", "batch_size", "lr"):
            if getattr(self, key) is None:
                raise ValueError(f"{self.name}: '{key}' was not set (the benchmark supplies a default)")

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, start: StateDict, ctx: FitContext) -> StateDict:
        self._check_budget()
        adapter, task = ctx.adapter, ctx.task
        adapter.set_state(start)
        ctx.params = adapter.trainable_parameters()
        ctx.optimizer = self.make_optimizer(list(ctx.params.values()))
        scheduler = torch.optim.lr_scheduler.LambdaLR(ctx.optimizer, self.lr_factor)
        generator = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        self.before_training_exp(ctx)
        for ctx.iteration, batch in enumerate(adapter.train_batches(task, self.batch_size, self.steps, generator)):
            def closure(batch=batch):
                ctx.optimizer.zero_grad(set_to_none=True)
                loss = adapter.loss(batch, task)
                loss = self.before_backward(ctx, loss, batch)
                loss.backward()
                self.after_backward(ctx)
                return loss

            loss = ctx.optimizer.step(closure)
            check_iteration(ctx, loss)  # a non-finite loss or gradient norm stops the run (cl_merge.divergence)
            scheduler.step()
            self.after_update(ctx)
            if ctx.on_iteration is not None:
                ctx.on_iteration(ctx.iteration + 1, float(loss.detach()))
        self.after_training_exp(ctx)
        ctx.optimizer.zero_grad(set_to_none=True)
        return adapter.get_state()
