"""ACC / BWT of the merging baselines on the mini suite (one order, mini defaults unless overridden):
c-ta, c-ties (seed variant), c-ties-fb (FusionBench variant), magmax, opcm, swa.

All runs share one results folder, so the independent experts are trained once (first strategy) and
every other merger reuses them from the expert cache: the figures differ only by the merger.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/baselines_mini.py [--order 1] [--seed 0] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import cl_merge  # noqa: F401  (torchvision shim before open_clip)
from cl_merge.config import resolve
from cl_merge.runner import execute

STRATEGIES = ["c-ta", "c-ties", "c-ties-fb", "magmax", "opcm", "swa"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--order", default="1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        print(f"mini suite, order {args.order}, seed {args.seed}, overrides {args.set or 'none (defaults)'}, "
              f"torch threads {args.threads}")
        print(f"{'strategy':12s}{'ACC':>8s}{'BWT':>9s}{'norm.ACC':>10s}{'merge s':>9s}{'wall s':>8s}  final row")
        experts = None
        for strategy in args.strategies:
            cfg = resolve("mini", strategy=strategy, order=args.order, seed=args.seed, overrides=list(args.set))
            t = time.perf_counter()
            result, _ = execute(cfg, out_dir=out, progress=False)
            wall = time.perf_counter() - t
            merge_s = result["timings"]["merge_s"]
            norm = result["normalized_acc"]  # mean over tasks (per task: normalized_acc_per_task)
            last = " ".join(f"{v:.3f}" for v in result["acc_matrix"][-1])
            print(f"{strategy:12s}{result['acc']:8.4f}{result['bwt']:9.4f}{norm:10.4f}{merge_s:9.2f}"
                  f"{wall:8.1f}  {last}", flush=True)
            if experts is None:
                experts = result["expert_acc"]
        if experts is not None:
            print("expert accuracies (shared by every strategy): " + " ".join(f"{v:.3f}" for v in experts))


if __name__ == "__main__":
    main()
