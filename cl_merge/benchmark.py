"""Benchmark interface: builds the model adapter (θ0 + heads) and the task stream for an order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, ClassVar, Dict, List, Optional

import annotated_types as at

from .components import Component
from .models.base import ModelAdapter
from .task import Stream


@dataclasses.dataclass
class Benchmark(Component):
    """Fields are the benchmark's options (``benchmark.KEY=VALUE`` on the CLI).

    ``train_defaults`` fills learners' unset ``steps``/``batch_size``/``lr`` so that every learner
    gets the same budget on a given benchmark.
    """

    num_tasks: Optional[Annotated[int, at.Ge(2)]] = None  # a stream has at least 2 tasks
    train_defaults: ClassVar[Dict[str, Any]] = {}
    default_order: ClassVar[Any] = 1

    def orders(self) -> List[Any]:
        raise NotImplementedError

    def build_model(self, cache_dir: Path, device: str, eval_batch_size: int) -> ModelAdapter:
        raise NotImplementedError

    def build_stream(self, order: Any, seed: int) -> Stream:
        raise NotImplementedError

    #: where the protocol loop keeps the states: "memory", or "disk" (tensor by tensor; see cl_merge.store)
    parameter_store: ClassVar[str] = "memory"

    def parameter_storage(self, *, adapter: ModelAdapter, checkpointer, device: str):
        """The parameter store backend of a run (``cl_merge.store``); in memory unless overridden."""
        from .store import MemoryStorage

        return MemoryStorage()

    def finish_run(self, stream: Stream, record: Dict[str, Any]) -> None:
        """Called with the finished run's record before the results are assembled (benchmark detail)."""

    def task_names(self, order: Any) -> Optional[List[str]]:
        """The stream's task names in order, without loading data, or None if only ``build_stream``
        knows them. The Ray engine plans shared experts from these names before anything runs."""
        return None


def fixed_or_seeded_order(order: Any, benchmark: str, fixed_hint: str) -> Any:
    """Canonical id of an order that is either 1 (the benchmark's own order) or ``seed:N`` (a seeded
    permutation of it); one clear error otherwise."""
    text = str(order)
    if text == "1":
        return 1
    if text.startswith("seed:") and text[5:].lstrip("-").isdigit():
        return f"seed:{int(text[5:])}"
    from .errors import UserError

    raise UserError(f"unknown order '{order}' for {benchmark}; use 1 ({fixed_hint}) or seed:N (a random permutation)")


def permuted(names: List[str], order: Any) -> List[str]:
    """``names`` in a canonical order from ``fixed_or_seeded_order``: as listed for 1, else shuffled
    with ``random.Random(N)`` (stable across runs and machines)."""
    import random

    names = list(names)
    if order != 1:
        random.Random(int(str(order)[5:])).shuffle(names)
    return names
