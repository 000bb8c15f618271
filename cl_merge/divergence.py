"""Divergence detection: a run whose loss, gradients or weights stop being finite is not a result.

The training loop (``GradientLearner.fit``) checks the loss and the gradient norm of every iteration;
the protocol loop checks the expert and the merged weights after each step. The first non-finite
quantity raises ``Diverged``, which names the stream step, the task and the quantity. The CLI turns it
into one line and exit code ``EXIT_CODE``; with ``run.on_divergence=record`` the runner instead writes
the run marked ``diverged: true`` (README, "Divergence").
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch

EXIT_CODE = 3  # distinct from bad input (2) and internal failure (1)


class Diverged(Exception):
    """A non-finite quantity at stream step ``step`` (1-based) on ``task``."""

    def __init__(self, step: int, task: str, quantity: str, value: float, iteration: Optional[int] = None,
                 where: Optional[str] = None):
        self.step, self.task, self.quantity, self.value = step, task, quantity, value
        self.iteration, self.where = iteration, where
        at = f"training iteration {iteration}" if iteration is not None else "after the merge"
        detail = f" in {where}" if where else ""
        super().__init__(f"diverged at step {step} (task {task}, {at}): {quantity} is {value}{detail}")

    def __reduce__(self):  # picklable across demo worker processes and Ray tasks
        return (Diverged, (self.step, self.task, self.quantity, self.value, self.iteration, self.where))

    def record(self) -> Dict[str, object]:
        """The ``divergence`` entry of a results file written with ``run.on_divergence=record``."""
        return {"step": self.step, "task": self.task, "quantity": self.quantity, "value": str(self.value),
                "iteration": self.iteration, "tensor": self.where}


def _finite(value: float) -> bool:
    return math.isfinite(value)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global L2 norm of the gradients (inf/nan as soon as one entry is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)  # one fused pass, as clip_grad_norm_ does
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


def check_iteration(ctx, loss: torch.Tensor) -> None:
    """After one optimizer step of ``GradientLearner.fit``: the loss and the gradient norm are finite."""
    value = float(loss.detach())
    if not _finite(value):
        raise Diverged(ctx.step, ctx.task.name, "training loss", value, iteration=ctx.iteration + 1)
    norm = grad_norm(ctx.params.values())
    if not _finite(norm):
        raise Diverged(ctx.step, ctx.task.name, "gradient norm", norm, iteration=ctx.iteration + 1)


def first_non_finite(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """Name of the first tensor holding a nan or inf, else None."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_step(step: int, task: str, expert: Dict[str, torch.Tensor], merged: Dict[str, torch.Tensor]) -> None:
    """After a protocol step: the expert and the merged (deployed) weights are finite."""
    for quantity, state in (("expert weight", expert), ("merged weight", merged)):
        bad = first_non_finite(state)
        if bad is not None:
            t = state[bad]
            value = float(t[~torch.isfinite(t)].flatten()[0])
            raise Diverged(step, task, quantity, value, where=bad)
