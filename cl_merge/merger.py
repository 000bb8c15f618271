"""Merger interface: folds a task expert into the deployed model.

Mergers keep O(1) state in the number of tasks (running sums, a running max, a norm average), never
a list of past task vectors; ``state_dict`` returns exactly that state for checkpoints.

Notation (DESIGN.md): θ0 = ``base``, τ_t = expert − start, M_t = deployed_t − θ0.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch

from .components import Component
from .params import StateDict


@dataclasses.dataclass
class Merger(Component):
    def reset(self, base: StateDict) -> None:
        """Called once before the first task."""

    def merge(self, base: StateDict, previous: StateDict, expert: StateDict, start: StateDict,
              step: int) -> StateDict:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state but a checkpoint holds some")
