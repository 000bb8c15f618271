"""Task and Stream: what a benchmark hands to the protocol loop."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset


@dataclasses.dataclass
class Task:
    """One task of a stream.

    ``evaluator(adapter, task, split) -> score in [0, 1]`` overrides the model adapter's default
    scoring (classification accuracy for CLIP); language tasks bring their own metric here.
    ``fingerprint`` identifies the task's data and is part of the expert-cache key.
    """

    name: str
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]
    train: Dataset
    val: Dataset
    test: Dataset
    fingerprint: str
    evaluator: Optional[Callable[[Any, "Task", str], float]] = None
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> Dataset:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


@dataclasses.dataclass
class Stream:
    """An ordered list of tasks plus how the order was chosen."""

    benchmark: str
    tasks: List[Task]
    order: Any = None
    seed: Optional[int] = None

    @property
    def names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def set_phase(self, phase: str, task: str) -> None:
        """Told by the protocol loop before each evaluation (``phase``: "evaluate θ0", "expert t",
        "step t/T evaluate"); a stream that logs its evaluations (MergeBench) records it."""

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)


def take_prefix(tasks: Sequence[Task], num_tasks: Optional[int]) -> List[Task]:
    if num_tasks is None:
        return list(tasks)
    if not 2 <= num_tasks <= len(tasks):
        from .errors import UserError

        raise UserError(f"num_tasks must be between 2 and {len(tasks)}; got {num_tasks}")
    return list(tasks[:num_tasks])
