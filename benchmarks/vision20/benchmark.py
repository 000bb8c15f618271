"""``vision20``: the SAIM paper's 20 CLIP image-classification tasks (its Table 5 numbering), its five
task orders (Table 6) plus seeded random orders, settings 8/14/20 as order prefixes, on open_clip
ViT-B-32 / ViT-B-16 / ViT-L-14.

Training budget (``train_defaults``): Adam(W) lr 1e-5, batch 128, cosine schedule, weight decay 0.01
(the learners' default) as in the paper; 2000 steps per task. The paper takes its epochs from the
ISO-C protocol, whose per-dataset epochs (``data/tasks.json``: ``iso_c_epochs``) were chosen to give
about 2000 iterations at batch 128 on every dataset (e.g. SUN397 14 epochs x 17.9k images / 128 =
1954, MNIST 5 x 54k / 128 = 2109, PCAM 1 x 262k / 128 = 2048); each task records its exact
epoch-based step count in ``metadata['iso_c_steps']``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np

from cl_merge.benchmark import Benchmark
from cl_merge.models.clip import ClipClassifier
from cl_merge.registry import register_benchmark
from cl_merge.task import Stream, Task, take_prefix

from . import data as D
from .model import Preprocess, create_clip, preprocess_for, resolve_model_name, weights_kind
from .specs import (NUM_TASKS, TaskSpec, canonical_order, order_permutation, spec_by_name, table6_orders,
                    task_specs)

PAPER_BATCH_SIZE = 128


@dataclasses.dataclass
class Vision20Stream(Stream):
    """A stream plus the explicit order: ``permutation`` holds all 20 Table 5 ids of the order (the
    run uses its first ``len(tasks)``)."""

    permutation: List[int] = dataclasses.field(default_factory=list)

    def order_record(self) -> Dict[str, Any]:
        return {"id": self.order, "permutation": list(self.permutation),
                "task_ids": [t.metadata["table5_id"] for t in self.tasks]}


@register_benchmark
@dataclasses.dataclass
class Vision20Benchmark(Benchmark):
    name = "vision20"
    description = ("SAIM's 20 CLIP image tasks (Table 5), orders 1-5 (Table 6) or seed:N, settings "
                   "num_tasks=8/14/20; open_clip ViT-B-32/B-16/L-14")
    train_defaults = {"steps": 2000, "batch_size": PAPER_BATCH_SIZE, "lr": 1e-5}
    default_order = 1

    model: str = "ViT-B-32"  # open_clip name (ViT-B-32, ViT-B-16, ViT-L-14), or a model config JSON path
    pretrained: Optional[str] = "openai"  # open_clip tag, a checkpoint path, or none (random init)
    quick_gelu: Optional[bool] = None  # None: QuickGELU for the OpenAI architectures/weights
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    data_root: Optional[str] = None  # local copies: DIR/<task name>/ (see data.py)
    data_paths: Tuple[str, ...] = ()  # per-task local copies: task=DIR,task=DIR
    hf_cache_dir: Optional[str] = None  # datasets cache (default: the HF cache)
    val_fraction: float = 0.1  # held out of train where a dataset has no validation split
    val_seed: int = 0  # seed of that hold-out (and of the *_limit subsets)
    train_augment: bool = True  # open_clip's training crop (RandomResizedCrop 0.9-1), as task vectors/ISO-C
    train_limit: Optional[int] = None  # fixed-seed subsets, for smoke runs only
    val_limit: Optional[int] = None
    test_limit: Optional[int] = None
    eval_cache: Literal["disk", "memory"] = "disk"  # uint8 val/test caches under the run's cache dir
    num_workers: int = 4  # DataLoader workers for training batches and cache building

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        for key in ("train_limit", "val_limit", "test_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or none; got {value}")
        if self.num_tasks is not None and not 2 <= self.num_tasks <= NUM_TASKS:
            raise ValueError(f"num_tasks must be between 2 and {NUM_TASKS} (the paper's settings: 8, 14, 20); "
                             f"got {self.num_tasks}")
        self._paths = D.parse_data_paths(self.data_paths, [s.name for s in task_specs()])
        self._cache = D.CacheRoot(mode=self.eval_cache)
        self._preprocess: Optional[Preprocess] = None

    # ---- orders -------------------------------------------------------------------------------------
    def orders(self) -> List[Any]:
        """The listed orders (Table 6); ``seed:N`` orders are accepted too (see ``resolve_order``)."""
        return sorted(table6_orders())

    def resolve_order(self, order: Any) -> Any:
        """Canonical id of a requested order: 1..5 or ``"seed:N"``; a UserError otherwise."""
        return canonical_order(order)

    # ---- model ----------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return resolve_model_name(self.model)

    def preprocess(self) -> Preprocess:
        if self._preprocess is None:
            self._preprocess = preprocess_for(self.model_name, self.pretrained)
        return self._preprocess

    def model_id(self) -> str:
        kind = weights_kind(self.pretrained)
        weights = {"none": "random-init", "tag": str(self.pretrained),
                   "file": f"file:{Path(str(self.pretrained)).name}"}[kind]
        return f"open_clip:{self.model_name}/{weights}"

    def build_model(self, cache_dir: Path, device: str, eval_batch_size: int) -> ClipClassifier:
        import open_clip

        self._cache.path = Path(cache_dir)
        name = self.model_name
        model = create_clip(name, self.pretrained, self.quick_gelu)
        built = getattr(model.visual, "preprocess_cfg", None)
        expected = self.preprocess()
        if built and (int(np.atleast_1d(built["size"])[0]) != expected.size
                      or tuple(built["mean"]) != expected.mean or tuple(built["std"]) != expected.std):
            raise RuntimeError(f"open_clip preprocessing for {name} {built} differs from the suite's {expected}")
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if str(device).startswith("cuda") else "fp32"
        return ClipClassifier(model, open_clip.get_tokenizer(name), model_id=self.model_id(),
                              head_cache_dir=Path(cache_dir) / "heads", device=device,
                              eval_batch_size=eval_batch_size, num_workers=self.num_workers,
                              precision=precision)

    # ---- data ------------------------------------------------------------------------------------------
    def split_sizes(self, name: str) -> Dict[str, int]:
        """Examples per split of task ``name`` from the datasets' published row counts
        (data/split_sizes.json) under this benchmark's hold-out and limits, for ``cl-merge plan``."""
        rows = json.loads((Path(__file__).resolve().parent / "data" / "split_sizes.json").read_text())["rows"][name]
        train, val = rows["train"], rows.get("val")
        if val is None:  # D.split_off_validation's hold-out
            val = min(max(int(round(train * self.val_fraction)), 1), train - 1)
            train -= val
        cap = lambda n, limit: n if limit is None else min(n, limit)  # noqa: E731
        return {"train": cap(train, self.train_limit), "val": cap(val, self.val_limit),
                "test": cap(rows["test"], self.test_limit)}

    def build_task(self, spec: TaskSpec) -> Task:
        source = D.resolve_source(spec, self.data_root, self._paths)
        train_hf = D.load_split(spec, spec.train_split, source, self.hf_cache_dir)
        test_hf = D.load_split(spec, spec.test_split, source, self.hf_cache_dir)
        image_col = D.pick_column(train_hf, spec.image_column, D.IMAGE_COLUMNS, "image", spec.name)
        label_col = D.pick_column(train_hf, spec.label_column, D.LABEL_COLUMNS, "label", spec.name)
        train_labels = D.read_labels(train_hf, label_col, spec)
        test_labels = D.read_labels(test_hf, D.pick_column(test_hf, label_col, D.LABEL_COLUMNS, "label", spec.name),
                                    spec)
        test_image_col = D.pick_column(test_hf, image_col, D.IMAGE_COLUMNS, "image", spec.name)

        if spec.val_split is not None:
            val_hf = D.load_split(spec, spec.val_split, source, self.hf_cache_dir)
            val_image_col = D.pick_column(val_hf, image_col, D.IMAGE_COLUMNS, "image", spec.name)
            val_labels = D.read_labels(val_hf, D.pick_column(val_hf, label_col, D.LABEL_COLUMNS, "label",
                                                             spec.name), spec)
            train_idx, val_idx = np.arange(len(train_hf)), np.arange(len(val_hf))
            val_origin = spec.val_split
        else:
            val_hf, val_image_col, val_labels = train_hf, image_col, train_labels
            train_idx, val_idx = D.split_off_validation(len(train_hf), self.val_fraction, (self.val_seed, spec.id))
            val_origin = f"{self.val_fraction:g} of {spec.train_split} (seed {self.val_seed})"
        train_idx = D.subsample(train_idx, self.train_limit, (self.val_seed, spec.id, 1))
        val_idx = D.subsample(val_idx, self.val_limit, (self.val_seed, spec.id, 2))
        test_idx = D.subsample(np.arange(len(test_hf)), self.test_limit, (self.val_seed, spec.id, 3))

        pp = self.preprocess()
        digests = {
            "train": _split_digest(D.content_digest(train_hf, image_col, train_labels), train_idx),
            "val": _split_digest(D.content_digest(val_hf, val_image_col, val_labels), val_idx),
            "test": _split_digest(D.content_digest(test_hf, test_image_col, test_labels), test_idx),
        }
        geometry = {"size": pp.size, "resize_mode": pp.resize_mode, "interpolation": pp.interpolation}
        fingerprint = hashlib.sha256(json.dumps({
            "task": spec.name, "source": source.describe(spec), "splits": digests, "preprocess": pp.as_dict(),
            "train_augment": self.train_augment, "classnames": list(spec.classnames),
            "templates": list(spec.templates),
        }, sort_keys=True).encode()).hexdigest()

        train = D.ImageSplit(train_hf, image_col, train_idx, train_labels[train_idx],
                             pp.tensor_transform(train=self.train_augment))
        splits = {}
        for split, hf, col, labels, idx in (("val", val_hf, val_image_col, val_labels, val_idx),
                                            ("test", test_hf, test_image_col, test_labels, test_idx)):
            key = hashlib.sha256(json.dumps([digests[split], geometry], sort_keys=True).encode()).hexdigest()[:20]
            source_split = D.ImageSplit(hf, col, idx, labels[idx], pp.tensor_transform(train=False))
            splits[split] = D.EvalSplit(source_split, pp, self._cache, key=f"{spec.name}-{split}-{key}",
                                        label=f"{spec.name}/{split}", num_workers=self.num_workers)
        metadata = {
            "table5_id": spec.id, "title": spec.title, "source": source.describe(spec),
            "splits": {"train": spec.train_split, "val": val_origin, "test": spec.test_split},
            "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
            "iso_c_epochs": spec.iso_c_epochs,
            "iso_c_steps": math.ceil(spec.iso_c_epochs * len(train_idx) / PAPER_BATCH_SIZE),
            "fusionbench": spec.fusionbench,
        }
        return Task(name=spec.name, classnames=spec.classnames, templates=spec.templates, train=train,
                    val=splits["val"], test=splits["test"], fingerprint=fingerprint, metadata=metadata)

    def task_names(self, order: Any) -> List[str]:
        specs = {s.id: s for s in task_specs()}
        return [specs[i].name for i in take_prefix(order_permutation(canonical_order(order)), self.num_tasks)]

    def build_stream(self, order: Any, seed: int) -> Vision20Stream:
        order = canonical_order(order)
        permutation = order_permutation(order)
        ids = take_prefix(permutation, self.num_tasks)
        specs = {s.id: s for s in task_specs()}
        tasks = [self.build_task(specs[i]) for i in ids]
        return Vision20Stream(benchmark=self.name, tasks=tasks, order=order, seed=seed, permutation=permutation)

    def task(self, name: str) -> Task:
        """One task by name (e.g. to inspect its data or evaluate an expert on it)."""
        return self.build_task(spec_by_name(name))


def _split_digest(content: str, indices: np.ndarray) -> str:
    h = hashlib.sha256(content.encode())
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return h.hexdigest()
