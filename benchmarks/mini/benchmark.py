"""The embedded ``mini`` suite: procedurally generated tasks + a tiny CLIP pre-trained on generated
captioned images (weights shipped in ``weights/``). Fully offline; the default of the demo and tests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cl_merge.benchmark import Benchmark
from cl_merge.components import PositiveInt
from cl_merge.errors import UserError
from cl_merge.models.clip import ClipClassifier
from cl_merge.registry import register_benchmark
from cl_merge.task import Stream, Task, take_prefix

from .data import TASKS, make_split
# the model module (open_clip, ~2 s to import) is loaded when a model is built, not at registration
MODEL_NAME = "cl-merge-mini-vit"  # = pretrain.MODEL_NAME

HERE = Path(__file__).resolve().parent
ORDERS_FILE = HERE / "orders.json"


@lru_cache(maxsize=1)
def task_orders() -> Dict[str, List[str]]:
    return json.loads(ORDERS_FILE.read_text())["orders"]


def to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@register_benchmark
@dataclasses.dataclass
class MiniBenchmark(Benchmark):
    name = "mini"
    description = "offline generated suite + tiny pre-trained CLIP (the demo/test default)"
    train_defaults = {"steps": 100, "batch_size": 32, "lr": 3e-4}
    default_order = 1

    n_train: PositiveInt = 512
    n_val: PositiveInt = 128
    n_test: PositiveInt = 256
    data_seed: int = 0

    def orders(self) -> List[Any]:
        return [int(k) for k in task_orders()]

    def build_model(self, cache_dir: Path, device: str, eval_batch_size: int) -> ClipClassifier:
        from .pretrain import load_pretrained, load_tokenizer

        model = load_pretrained()
        return ClipClassifier(model, load_tokenizer(), model_id=f"open_clip:{MODEL_NAME}/mini-pretrained",
                              head_cache_dir=Path(cache_dir) / "heads", device=device,
                              eval_batch_size=eval_batch_size)

    def split_sizes(self, name: str) -> Dict[str, int]:
        """Examples per split of task ``name`` without drawing them (``cl-merge plan``)."""
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def build_task(self, name: str) -> Task:
        return _build_task(name, self.n_train, self.n_val, self.n_test, self.data_seed)

    def task_names(self, order: Any) -> List[str]:
        orders = task_orders()
        if str(order) not in orders:
            raise UserError(f"unknown order '{order}' for mini; known: {', '.join(orders)}")
        return take_prefix(orders[str(order)], self.num_tasks)

    def build_stream(self, order: Any, seed: int) -> Stream:
        names = self.task_names(order)
        return Stream(benchmark=self.name, tasks=[self.build_task(n) for n in names], order=order, seed=seed)


# Drawing a task's images takes seconds; every run of a demo/leaderboard/test process reuses them
# (tasks are read-only: datasets of fixed tensors).
@lru_cache(maxsize=64)
def _build_task(name: str, n_train: int, n_val: int, n_test: int, data_seed: int) -> Task:
    spec = {t.name: t for t in TASKS}[name]
    mean, std = _normalisation()
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits, digest = {}, hashlib.sha256(name.encode())
    for split, n in sizes.items():
        images, labels = make_split(name, split, n, data_seed)
        digest.update(images.tobytes())
        digest.update(labels.tobytes())
        splits[split] = TensorDataset(to_tensor(images, mean, std), torch.from_numpy(labels).long())
    return Task(name=name, classnames=tuple(spec.classnames), templates=tuple(spec.templates),
                fingerprint=digest.hexdigest(), **splits)


@lru_cache(maxsize=1)
def _normalisation():
    config = json.loads((HERE / "model_config" / f"{MODEL_NAME}.json").read_text())
    pp = config.get("preprocess_cfg", {})
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(pp.get("mean", OPENAI_DATASET_MEAN)), tuple(pp.get("std", OPENAI_DATASET_STD))
