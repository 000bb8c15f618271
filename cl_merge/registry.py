"""Explicit registries for learners, mergers, strategies and benchmarks.

Built-ins register themselves when ``cl_merge.strategies`` / ``cl_merge.benchmarks`` are imported.
Third-party packages declare an entry point in the group ``cl_merge.strategies``; the object it
names is loaded (a module registers on import; a function is called with no arguments).
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar

from .errors import UserError

T = TypeVar("T")
ENTRY_POINT_GROUP = "cl_merge.strategies"
#: sequential / independent: one merge per task (the continual protocols); multitask: every expert
#: trained independently from θ0, then merged in one call (docs/protocol.md)
PROTOCOLS = ("sequential", "independent", "multitask")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, obj: T, name: Optional[str] = None) -> T:
        key = name or getattr(obj, "name", None)
        if not key:
            raise ValueError(f"a {self.kind} needs a name to register")
        if key in self._items and self._items[key] is not obj:
            raise ValueError(f"{self.kind} '{key}' is already registered")
        self._items[key] = obj
        return obj

    def __call__(self, obj: T) -> T:  # use as a class decorator
        return self.register(obj)

    def get(self, name: str) -> T:
        ensure_loaded()
        if name not in self._items:
            known = ", ".join(self.names()) or "none"
            raise UserError(f"unknown {self.kind} '{name}'; known: {known} (see `cl-merge list`)")
        return self._items[name]

    def names(self) -> List[str]:
        ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        ensure_loaded()
        return name in self._items

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A named (learner, merger) pair with its default protocol and hyperparameters.

    ``hyperparameters`` uses the same qualified keys as CLI overrides, e.g. ``{"merger.alpha": 0.3}``.
    """

    name: str
    learner: str
    merger: str
    protocol: str
    hyperparameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"strategy {self.name}: protocol must be one of {PROTOCOLS}")


LEARNERS: Registry[Any] = Registry("learner")
MERGERS: Registry[Any] = Registry("merger")
STRATEGIES: Registry[Strategy] = Registry("strategy")
BENCHMARKS: Registry[Any] = Registry("benchmark")

_loaded = False


def ensure_loaded() -> None:
    """Import the built-in strategies and benchmarks, then entry-point plugins (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("cl_merge.strategies")
    importlib.import_module("cl_merge.benchmarks")
    load_plugins()


def load_plugins() -> List[str]:
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break the harness; say which one
            raise UserError(f"could not load cl_merge plugin '{ep.name}' ({ep.value}): {exc}") from exc
        if callable(obj) and not isinstance(obj, type):
            obj()
        loaded.append(ep.name)
    return loaded


def register_strategy(name: str, learner: str, merger: str, protocol: str,
                      hyperparameters: Optional[Dict[str, Any]] = None, description: str = "") -> Strategy:
    return STRATEGIES.register(Strategy(name, learner, merger, protocol, dict(hyperparameters or {}), description))


def register_learner(cls: Callable) -> Callable:
    return LEARNERS.register(cls)


def register_merger(cls: Callable) -> Callable:
    return MERGERS.register(cls)


def register_benchmark(cls: Callable) -> Callable:
    return BENCHMARKS.register(cls)
