"""Fetch everything a vision20 run needs while the machine has network access (then run offline)::

    python -m cl_merge.benchmarks.vision20.prepare --models ViT-B-32 ViT-B-16 ViT-L-14 \\
        --cache-dir /scratch/cl_merge_cache

downloads the backbones' OpenAI weights (open_clip's cache) and the 20 datasets (the Hugging Face
datasets cache, or ``--hf-cache-dir``), prints each task's split sizes and classes, and with
``--cache-dir`` also builds the uint8 val/test caches a run with ``run.cache_dir=<same dir>`` reuses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from cl_merge.errors import UserError


def main(argv: Optional[List[str]] = None) -> int:
    from .benchmark import Vision20Benchmark
    from .model import create_clip
    from .specs import task_specs

    p = argparse.ArgumentParser(description="download the vision20 weights and datasets (needs network)")
    p.add_argument("--models", nargs="*", default=["ViT-B-32"], help="open_clip backbones to fetch")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--tasks", nargs="*", help="task names (default: all 20)")
    p.add_argument("--hf-cache-dir", help="datasets cache directory (default: the HF cache)")
    p.add_argument("--data-root", help="read local copies from DIR/<task>/ instead of the hub")
    p.add_argument("--cache-dir", type=Path, help="also build the uint8 val/test caches here (per model)")
    p.add_argument("--num-workers", type=int, default=8)
    args = p.parse_args(argv)

    for model in args.models:
        create_clip(model, args.pretrained, None)
        print(f"{model} ({args.pretrained}): weights available")
    names = args.tasks or [s.name for s in task_specs()]
    for model in args.models:
        bench = Vision20Benchmark(model=model, pretrained=args.pretrained, hf_cache_dir=args.hf_cache_dir,
                                  data_root=args.data_root, num_workers=args.num_workers)
        if args.cache_dir is not None:
            bench._cache.path = args.cache_dir
        for name in names:
            task = bench.task(name)
            sizes = task.metadata["sizes"]
            print(f"{model} {task.metadata['table5_id']:>2} {name:<16} {task.classes:>4} classes  train "
                  f"{sizes['train']:>6}  val {sizes['val']:>5}  test {sizes['test']:>6}  ({task.metadata['source']})")
            if args.cache_dir is not None:
                task.val.images()
                task.test.images()
        if args.cache_dir is None:
            break  # without eval caches the datasets are fetched once, whatever the model
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
