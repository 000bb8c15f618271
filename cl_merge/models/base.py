"""The model-adapter interface shared by the vision and language paths.

Protocol, learners, mergers and metrics only see: the mergeable parameters (name -> tensor), a loss
on a batch, batches of a task's training data, and a score in [0, 1] per task.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, Iterator

import torch

from ..params import StateDict
from ..task import Task


class ModelAdapter(abc.ABC):
    #: what the parameters belong to, e.g. "open_clip:ViT-B-32/openai"; recorded in results
    model_id: str = ""

    @abc.abstractmethod
    def trainable_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """The live parameters that learners train and mergers merge (e.g. the CLIP image tower)."""

    def get_state(self) -> StateDict:
        return {k: p.detach().clone() for k, p in self.trainable_parameters().items()}

    @torch.no_grad()
    def set_state(self, state: StateDict) -> None:
        params = self.trainable_parameters()
        if params.keys() != state.keys():
            raise ValueError("state does not match the model's mergeable parameters")
        for name, p in params.items():
            p.copy_(state[name])

    @abc.abstractmethod
    def base_fingerprint(self) -> str:
        """Identifies θ0 (model + weights); part of the expert-cache key."""

    @abc.abstractmethod
    def prepare(self, task: Task) -> None:
        """Build what the task needs before training/evaluation (e.g. its frozen head)."""

    @abc.abstractmethod
    def loss(self, batch, task: Task) -> torch.Tensor:
        """Training loss on one batch of ``task``."""

    @abc.abstractmethod
    def train_batches(self, task: Task, batch_size: int, steps: int, generator: torch.Generator) -> Iterator:
        """Exactly ``steps`` shuffled training batches (epochs repeat as needed)."""

    @abc.abstractmethod
    def score(self, task: Task, split: str = "test") -> float:
        """The adapter's default score in [0, 1] for a task (accuracy for classifiers)."""

    # ---- functional per-sample loss (torch.func), used by the Fisher diagonal (cl_merge.fisher) ----
    def per_sample_loss(self, task: Task) -> Callable[..., torch.Tensor]:
        """``loss(params, *sample) -> scalar``: the training loss of ONE sample of ``task`` (a dataset
        item, no batch dimension) as a pure function of the mergeable parameters (name -> tensor),
        so ``torch.func.vmap(grad(loss))`` gives per-sample gradients. Optional: adapters without it
        cannot feed Fisher-based mergers."""
        raise NotImplementedError

    def evaluate(self, task: Task, split: str = "test") -> float:
        if task.evaluator is not None:
            return float(task.evaluator(self, task, split))
        return float(self.score(task, split))

    @property
    def device(self) -> torch.device:
        return next(iter(self.trainable_parameters().values())).device
