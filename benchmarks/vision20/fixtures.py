"""Tiny synthetic local copies of the 20 datasets, laid out and typed like the real Hugging Face
repositories, for offline tests and dry runs of the whole pipeline::

    python -m cl_merge.benchmarks.vision20.fixtures /tmp/v20-fake
    cl-merge run --benchmark vision20 --strategy c-ta benchmark.data_root=/tmp/v20-fake \\
        benchmark.pretrained=none benchmark.model=cl-merge-mini-vit benchmark.num_tasks=2 learner.steps=2

Each copy reproduces its dataset's quirks: split names (Food-101's test split is ``validation``;
Flowers102, PCAM and Rendered SST-2 ship a ``validation`` split, the others do not), column names
(FER2013: ``jpg``/``cls`` in webdataset tar shards), label types (PCAM: bool), dataset configs
(SVHN: ``cropped_digits/`` next to an unrelated ``full_numbers/``), extra columns (Oxford-IIIT Pet:
``image_id``, ``label_cat_dog``) and grayscale images (MNIST-like sets). Images are noise whose mean
brightness encodes the label, so a model can learn them.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np

from .specs import TaskSpec, task_specs

GRAYSCALE = {"mnist", "fashion_mnist", "emnist_letters", "kmnist"}
DEFAULT_SIZES = {"train": 12, "val": 4, "test": 6}
ROLE_OFFSET = {"train": 0, "test": 1, "val": 2}


def _image(rng: np.random.Generator, label: int, num_classes: int, gray: bool, size=(20, 16)):
    from PIL import Image

    level = int(40 + 170 * (label % max(num_classes, 1)) / max(num_classes - 1, 1))
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    pixels = np.clip(rng.normal(level, 20, size=shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L" if gray else "RGB")


def _labels(n: int, num_classes: int, offset: int) -> list:
    return [(i + offset) % num_classes for i in range(n)]


def _write_parquet(path: Path, spec: TaskSpec, n: int, seed: int, offset: int) -> None:
    import datasets

    rng = np.random.default_rng(seed)
    labels = _labels(n, spec.num_classes, offset)
    images = [_image(rng, y, spec.num_classes, spec.name in GRAYSCALE) for y in labels]
    if spec.label_type == "bool":
        features = {spec.label_column: datasets.Value("bool")}
        columns = {spec.label_column: [bool(y) for y in labels]}
    else:
        features = {spec.label_column: datasets.ClassLabel(names=list(spec.classnames))}
        columns = {spec.label_column: labels}
    features = {spec.image_column: datasets.Image(), **features}
    columns = {spec.image_column: images, **columns}
    if spec.name == "oxford_iiit_pet":
        features["image_id"] = datasets.Value("string")
        features["label_cat_dog"] = datasets.ClassLabel(names=["cat", "dog"])
        columns["image_id"] = [f"pet_{i}" for i in range(n)]
        columns["label_cat_dog"] = [y % 2 for y in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))


def _write_webdataset(path: Path, spec: TaskSpec, n: int, seed: int, offset: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, y in enumerate(_labels(n, spec.num_classes, offset)):
            buf = io.BytesIO()
            _image(rng, y, spec.num_classes, gray=True).save(buf, format="JPEG")
            for name, payload in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.cls", str(y).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def write_task(root: Path, spec: TaskSpec, sizes: Optional[Dict[str, int]] = None, seed: int = 0) -> Path:
    """Write one task's fake copy under ``root/<task name>/``; returns that folder."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    folder = Path(root) / spec.name
    splits = {"train": (spec.train_split, sizes["train"]), "test": (spec.test_split, sizes["test"])}
    if spec.val_split is not None:
        splits["val"] = (spec.val_split, sizes["val"])
    for role, (split, n) in splits.items():
        offset = ROLE_OFFSET[role]  # label of row i is (i + offset) % classes
        split_seed = seed * 1000 + spec.id * 10 + offset
        if spec.name == "fer2013":
            _write_webdataset(folder / split / "0.tar", spec, n, split_seed, offset)
        elif spec.hf_config:
            _write_parquet(folder / spec.hf_config / f"{split}-00000-of-00001.parquet", spec, n, split_seed, offset)
        else:
            _write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", spec, n, split_seed, offset)
    if spec.name == "svhn":  # the dataset's other config, with another schema, must be ignored
        import datasets

        other = datasets.Dataset.from_dict({"image": [_image(np.random.default_rng(seed), 0, 10, False)],
                                            "digits": [{"bbox": [[0, 0, 1, 1]], "label": [3]}]})
        other.to_parquet(str(folder / "full_numbers" / "train-00000-of-00001.parquet"))
    return folder


def write_all(root: Path, names: Optional[Iterable[str]] = None, sizes: Optional[Dict[str, int]] = None,
              seed: int = 0) -> Path:
    wanted = set(names) if names is not None else None
    for spec in task_specs():
        if wanted is None or spec.name in wanted:
            write_task(Path(root), spec, sizes, seed)
    return Path(root)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write tiny synthetic copies of the vision20 datasets")
    p.add_argument("root", type=Path)
    p.add_argument("--tasks", nargs="*", help="task names (default: all 20)")
    p.add_argument("--train", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--test", type=int, default=DEFAULT_SIZES["test"])
    args = p.parse_args(argv)
    write_all(args.root, args.tasks, {"train": args.train, "test": args.test})
    print(f"wrote synthetic vision20 data under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
