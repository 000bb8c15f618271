"""The suite's static data: the 20 task specs, class names, prompt templates and task orders, read from
the JSON files in ``data/`` (shipped with the package)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from cl_merge.errors import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
NUM_TASKS = 20
SETTINGS = (8, 14, 20)
SEEDED_ORDER = re.compile(r"seed:(\d+)")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    id: int  # the SAIM paper's Table 5 number
    name: str
    title: str
    hf_path: str
    hf_config: Optional[str]
    train_split: str
    val_split: Optional[str]  # None: 10% of train is held out
    test_split: str
    image_column: str
    label_column: str
    label_type: str  # "int" | "bool"
    num_classes: int
    iso_c_epochs: int
    fusionbench: str  # suffix of FusionBench's expert repos
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]


def _read(name: str) -> Dict[str, Any]:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def task_specs() -> Tuple[TaskSpec, ...]:
    """The 20 tasks in Table 5 order (``task_specs()[i - 1].id == i``)."""
    classnames = _read("classnames.json")["classnames"]
    templates = _read("templates.json")["templates"]
    specs = []
    for row in _read("tasks.json")["tasks"]:
        name = row["name"]
        spec = TaskSpec(
            id=int(row["id"]), name=name, title=row["title"],
            hf_path=row["hf"]["path"], hf_config=row["hf"]["config"],
            train_split=row["splits"]["train"], val_split=row["splits"]["val"], test_split=row["splits"]["test"],
            image_column=row["columns"]["image"], label_column=row["columns"]["label"],
            label_type=row["label_type"], num_classes=int(row["num_classes"]),
            iso_c_epochs=int(row["iso_c_epochs"]), fusionbench=row["fusionbench"],
            classnames=tuple(classnames[name]), templates=tuple(templates[name]),
        )
        if len(spec.classnames) != spec.num_classes:
            raise ValueError(f"vision20 data files disagree on {name}: {len(spec.classnames)} class names, "
                             f"{spec.num_classes} classes")
        specs.append(spec)
    specs.sort(key=lambda s: s.id)
    if [s.id for s in specs] != list(range(1, NUM_TASKS + 1)):
        raise ValueError("vision20 tasks.json must number its tasks 1..20")
    return tuple(specs)


def spec_by_name(name: str) -> TaskSpec:
    for spec in task_specs():
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in task_specs())
    raise UserError(f"unknown vision20 task '{name}'; known: {known}")


# ---- orders ------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _orders_file() -> Dict[str, Any]:
    return _read("orders.json")


def table6_orders() -> Dict[int, List[int]]:
    """The SAIM paper's five task orders (Table 6) as Table 5 ids."""
    return {int(k): list(v) for k, v in _orders_file()["table6"].items()}


def blocks() -> List[Tuple[int, int]]:
    """Id ranges that every order keeps together: tasks 1-8, 9-14, 15-20 (the 8/14/20 settings)."""
    return [(int(a), int(b)) for a, b in _orders_file()["blocks"]]


def seeded_order(seed: int) -> List[int]:
    """A random order that keeps the prefix property: positions 1-8 hold tasks 1-8, 9-14 hold 9-14,
    15-20 hold 15-20, each block shuffled by ``random.Random(seed)`` (stable across Python versions)."""
    rng = random.Random(int(seed))
    order: List[int] = []
    for lo, hi in blocks():
        block = list(range(lo, hi + 1))
        rng.shuffle(block)
        order.extend(block)
    return order


OrderId = Union[int, str]


def canonical_order(order: Any) -> OrderId:
    """1..5 (Table 6) or ``"seed:N"``; anything else is a UserError naming the valid forms."""
    text = str(order).strip()
    if text.isdigit() and int(text) in table6_orders():
        return int(text)
    match = SEEDED_ORDER.fullmatch(text)
    if match:
        return f"seed:{int(match.group(1))}"
    raise UserError(f"unknown order '{order}' for vision20; use 1-5 (the SAIM paper's Table 6) or seed:N "
                    f"(a seeded random order keeping tasks 1-8 and 9-14 as prefixes), e.g. --order seed:7")


def order_permutation(order: Any) -> List[int]:
    """The full 20-task permutation (Table 5 ids) of an order id."""
    order = canonical_order(order)
    if isinstance(order, int):
        return table6_orders()[order]
    return seeded_order(int(order.split(":", 1)[1]))
