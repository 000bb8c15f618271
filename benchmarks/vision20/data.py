"""Dataset adapters of the suite: load each task's Hugging Face dataset (or a local copy), normalise
its quirks (column names, bool labels, split names, missing validation splits) and expose torch
datasets of (image tensor, label).

- ``train``: decoded with PIL per item, open_clip's train (or inference) transform.
- ``val`` / ``test``: decoded and geometrically pre-processed once into uint8 arrays at model
  resolution (``EvalSplit``), kept on disk under the run's cache directory (or in memory), and
  evaluated in large batches normalised on the device.

Local copies (offline clusters): ``benchmark.data_root=DIR`` reads ``DIR/<task name>/`` for every
task that has one, ``benchmark.data_paths=task=DIR,...`` names a folder per task. A folder is either
``DatasetDict.save_to_disk`` output or a snapshot of the dataset's repository (parquet, arrow or
webdataset tar files named ``<split>.parquet``, ``<split>-*.parquet``, ``<split>/*.tar``, ...; a
dataset config such as SVHN's ``cropped_digits`` may be a sub-folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cl_merge.errors import UserError
from cl_merge.io import write_json_atomic
from cl_merge.console import log_line
from cl_merge.progress import console

from .model import Preprocess
from .specs import TaskSpec

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "cls", "fine_label")
_FILE_KINDS = (("parquet", (".parquet",)), ("arrow", (".arrow",)), ("webdataset", (".tar",)))


# ---- where a task's data comes from -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "hub" | "local"
    location: str  # HF dataset id or local folder

    def describe(self, spec: TaskSpec) -> str:
        if self.kind == "hub":
            return f"{self.location}" + (f" ({spec.hf_config})" if spec.hf_config else "")
        return f"local:{self.location}"


def parse_data_paths(items: Sequence[str], known: Sequence[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"benchmark.data_paths entry '{item}' is not TASK=PATH (e.g. sun397=/data/sun397)")
        if name not in known:
            raise UserError(f"benchmark.data_paths names unknown task '{name}'; known: {', '.join(known)}")
        out[name] = path
    return out


def resolve_source(spec: TaskSpec, data_root: Optional[str], data_paths: Dict[str, str]) -> Source:
    if spec.name in data_paths:
        path = Path(data_paths[spec.name]).expanduser()
        if not path.is_dir():
            raise UserError(f"benchmark.data_paths: {spec.name}={path} is not a folder")
        return Source("local", str(path))
    if data_root:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise UserError(f"benchmark.data_root={data_root} is not a folder")
        if (root / spec.name).is_dir():
            return Source("local", str(root / spec.name))
    return Source("hub", spec.hf_path)


# ---- loading splits ----------------------------------------------------------------------------
def load_split(spec: TaskSpec, split: str, source: Source, cache_dir: Optional[str] = None):
    """The ``split`` of the task's dataset as a ``datasets.Dataset``; a UserError if it cannot be had."""
    import datasets

    if source.kind == "local":
        ds = _load_local(Path(source.location), split, spec.hf_config, cache_dir)
        if ds is None:
            raise UserError(
                f"{spec.name}: no '{split}' split under {source.location}; expected a save_to_disk folder or "
                f"files named {split}.parquet / {split}-*.parquet / {split}/*.tar (Hugging Face repo layout)")
        return ds
    try:
        return datasets.load_dataset(spec.hf_path, spec.hf_config, split=split, cache_dir=cache_dir)
    except Exception as exc:  # offline + not cached, unknown split, hub errors: one line with the fix
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("the hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1) and it is not in the local cache; "
                if offline else "")
        name = spec.hf_path + (f" ({spec.hf_config})" if spec.hf_config else "")
        raise UserError(
            f"cannot load split '{split}' of {name} for task {spec.name}: {hint}{type(exc).__name__}: "
            f"{_first_line(exc)}. Download it once with network access (python -m "
            f"cl_merge.benchmarks.vision20.prepare), or point benchmark.data_root=DIR (DIR/{spec.name}/) or "
            f"benchmark.data_paths={spec.name}=DIR at a local copy") from exc


def _load_local(root: Path, split: str, config: Optional[str], cache_dir: Optional[str]):
    import datasets

    if (root / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(root))
        return dd[split] if split in dd else None
    if (root / split / "state.json").is_file():
        return datasets.load_from_disk(str(root / split))
    roots = [root / config, root] if config and (root / config).is_dir() else [root]
    for base in roots:
        found = _split_files(base, split)
        if found is not None:
            builder, files = found
            return datasets.load_dataset(builder, data_files={split: files}, split=split, cache_dir=cache_dir)
    return None


def _split_files(base: Path, split: str) -> Optional[Tuple[str, List[str]]]:
    files = [p for p in sorted(base.rglob("*")) if p.is_file()]

    def belongs(p: Path) -> bool:
        stem = p.name.split(".", 1)[0]
        return stem == split or stem.startswith(f"{split}-") or stem.startswith(f"{split}_") or p.parent.name == split

    for builder, suffixes in _FILE_KINDS:
        matched = [str(p) for p in files if p.suffix in suffixes and belongs(p)]
        if matched:
            return builder, matched
    return None


def pick_column(ds, preferred: str, candidates: Sequence[str], what: str, task: str) -> str:
    columns = list(ds.column_names)
    for name in (preferred, *candidates):
        if name in columns:
            return name
    raise UserError(f"{task}: no {what} column (expected '{preferred}'); the dataset has {', '.join(columns)}")


def read_labels(ds, column: str, spec: TaskSpec) -> np.ndarray:
    """Labels as int64, bool mapped False->0/True->1, strings of digits parsed; range-checked."""
    values = ds.with_format("arrow")[column]
    try:
        arr = np.asarray(values.to_numpy(zero_copy_only=False))
    except (TypeError, ValueError, AttributeError):
        arr = np.asarray(values.to_pylist())
    if arr.dtype == bool:
        labels = arr.astype(np.int64)
    elif arr.dtype.kind in "iu":
        labels = arr.astype(np.int64)
    else:
        try:
            labels = np.asarray([int(v.decode() if isinstance(v, bytes) else v) for v in arr], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{spec.name}: labels in column '{column}' are not class indices ({arr[:3]!r}...)") from exc
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(f"{spec.name}: labels span {labels.min()}..{labels.max()} but the task has "
                        f"{spec.num_classes} classes; the dataset does not match the suite's class names")
    return labels


def to_pil(value: Any):
    """An image cell (PIL image, {'bytes','path'} struct, raw bytes, or array) as a PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def content_digest(ds, image_column: str, labels: np.ndarray) -> str:
    """Cheap content identity of a split: its size, all labels and the raw bytes of three images."""
    h = hashlib.sha256()
    h.update(str(len(labels)).encode())
    h.update(labels.tobytes())
    table = ds.with_format("arrow")
    for i in sorted({0, len(labels) // 2, max(len(labels) - 1, 0)}):
        if i < len(labels):
            cell = table[i][image_column].to_pylist()[0]
            if isinstance(cell, dict):
                cell = cell.get("bytes") or cell.get("path")
            h.update(cell if isinstance(cell, (bytes, bytearray)) else repr(cell).encode())
    return h.hexdigest()


def split_off_validation(n: int, fraction: float, seed: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a fixed-seed ``fraction`` of ``range(n)`` held out, both sorted."""
    perm = np.random.default_rng(list(seed)).permutation(n)
    n_val = int(round(n * fraction))
    n_val = min(max(n_val, 1), n - 1) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def subsample(indices: np.ndarray, limit: Optional[int], seed: Sequence[int]) -> np.ndarray:
    """A fixed-seed subset of ``limit`` indices (all of them when limit is None or larger)."""
    if limit is None or limit >= len(indices):
        return indices
    rng = np.random.default_rng(list(seed))
    return np.sort(rng.choice(indices, size=int(limit), replace=False))


# ---- torch datasets -------------------------------------------------------------------------------
class ImageSplit(Dataset):
    """Rows ``indices`` of an HF dataset as (transform(PIL image), label)."""

    def __init__(self, hf, image_column: str, indices: np.ndarray, labels: np.ndarray, transform):
        self.hf = hf.select_columns([image_column])
        self.image_column = image_column
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)  # aligned with indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int):
        return to_pil(self.hf[int(self.indices[i])][self.image_column])

    def __getitem__(self, i: int):
        return self.transform(self.image(i)), int(self.labels[i])


class CacheRoot:
    """Where eval caches live; set by the benchmark once the run's cache directory is known."""

    def __init__(self, path: Optional[Path] = None, mode: str = "disk"):
        self.path = path
        self.mode = mode

    def file(self, name: str) -> Optional[Path]:
        if self.mode != "disk" or self.path is None:
            return None
        return Path(self.path) / "vision20-eval" / name


class EvalSplit(Dataset):
    """A val/test split decoded and pre-processed (resize + crop) once into uint8 N x H x W x 3 at model
    resolution, then normalised per batch; on disk (``np.load(mmap_mode='r')``) or in memory."""

    def __init__(self, source: ImageSplit, preprocess: Preprocess, cache: CacheRoot, key: str, label: str,
                 num_workers: int = 0):
        self.source = source
        self.preprocess = preprocess
        self.cache = cache
        self.key = key
        self.label = label  # e.g. "sun397/test", for progress lines
        self.num_workers = num_workers
        self.labels = torch.from_numpy(source.labels.copy())
        self._images: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def cache_file(self) -> Optional[Path]:
        return self.cache.file(f"{self.key}.npy")

    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = self._load_or_build()
        return self._images

    def _shape(self) -> Tuple[int, int, int, int]:
        s = self.preprocess.size
        return (len(self.source), s, s, 3)

    def _load_or_build(self) -> np.ndarray:
        path = self.cache_file
        if path is not None and path.is_file():
            try:
                arr = np.load(path, mmap_mode="r")
                if arr.shape == self._shape() and arr.dtype == np.uint8:
                    return arr
            except (ValueError, OSError):
                pass  # damaged cache: rebuilt below, never trusted
        if path is None:
            out = np.empty(self._shape(), dtype=np.uint8)
            self._fill(out)
            return out
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self._shape())
            self._fill(out)
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        write_json_atomic(path.with_suffix(".json"), {"task_split": self.label, "shape": list(self._shape()),
                                                      "preprocess": self.preprocess.as_dict()})
        return np.load(path, mmap_mode="r")

    def _fill(self, out: np.ndarray) -> None:
        n = len(self.source)
        where = f" -> {self.cache_file}" if self.cache_file is not None else " (in memory)"
        log_line(console, f"vision20: pre-processing {self.label}: {n} images at {self.preprocess.size}px{where}")
        decoder = _GeometrySplit(self.source, self.preprocess.geometry())
        loader = DataLoader(decoder, batch_size=64, shuffle=False, num_workers=self.num_workers,
                            collate_fn=_stack)
        done, next_report = 0, max(n // 10, 1)
        for batch in loader:
            out[done:done + len(batch)] = batch
            done += len(batch)
            if done >= next_report and done < n:
                log_line(console, f"vision20: {self.label}: {done}/{n} images")
                next_report += max(n // 10, 1)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self.images()[i : i + 1]))
        return self.preprocess.normalise(x)[0], int(self.labels[i])

    def iter_batches(self, batch_size: int, device) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(normalised float images on ``device``, labels) in order, ``batch_size`` at a time."""
        images = self.images()
        device = torch.device(device)
        for start in range(0, len(self), batch_size):
            chunk = torch.from_numpy(np.array(images[start : start + batch_size]))  # a copy: caches are read-only maps
            if device.type == "cuda":
                chunk = chunk.pin_memory().to(device, non_blocking=True)
            yield self.preprocess.normalise(chunk), self.labels[start : start + batch_size]


class _GeometrySplit(Dataset):
    def __init__(self, source: ImageSplit, geometry):
        self.source, self.geometry = source, geometry

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.geometry(self.source.image(i))


def _stack(items: List[np.ndarray]) -> np.ndarray:
    return np.stack(items)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
