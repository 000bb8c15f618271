"""Benchmark interface: builds the model adapter (θ0 + heads) and the task stream for an order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from .components import Component
from .models.base import ModelAdapter
from .task import Stream


@dataclasses.dataclass
class Benchmark(Component):
    """Fields are the benchmark's options (``benchmark.KEY=VALUE`` on the CLI).

    ``train_defaults`` fills learners' unset ``steps``/``batch_size``/``lr`` so that every learner
    gets the same budget on a given benchmark.
    """

    num_tasks: Optional[int] = None
    train_defaults: ClassVar[Dict[str, Any]] = {}
    default_order: ClassVar[Any] = 1

    def orders(self) -> List[Any]:
        raise NotImplementedError

    def build_model(self, cache_dir: Path, device: str, eval_batch_size: int) -> ModelAdapter:
        raise NotImplementedError

    def build_stream(self, order: Any, seed: int) -> Stream:
        raise NotImplementedError

    def task_names(self, order: Any) -> Optional[List[str]]:
        """The stream's task names in order, without loading data, or None if only ``build_stream``
        knows them. The Ray engine plans shared experts from these names before anything runs."""
        return None
