"""ACC / BWT of c-ft, ewc and er on the mini suite (one order, full mini defaults unless overridden).

Runs each strategy through the real runner (results JSON written under --out) and prints ACC, BWT,
the accuracy matrix's last row and the fit time. ``--set`` passes key=value overrides to every run
(e.g. ``benchmark.num_tasks=4``); ``--ewc-lambda`` adds one ewc run per value (the sweep that chose
the default λ).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/ewc_er_mini.py [--order 1] [--threads 1]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/ewc_er_mini.py --strategies ewc --ewc-lambda 1 90 1000 5000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import cl_merge  # noqa: F401  (torchvision shim before open_clip / avalanche)
from cl_merge.config import resolve
from cl_merge.runner import execute


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="+", default=["c-ft", "ewc", "er"])
    ap.add_argument("--ewc-lambda", nargs="*", type=float, default=[], help="extra ewc runs, one per λ")
    ap.add_argument("--er-mem", nargs="*", type=int, default=[], help="extra er runs, one per mem_size")
    ap.add_argument("--order", default="1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    runs = [(s, []) for s in args.strategies]
    runs += [("ewc", [f"learner.ewc_lambda={lam:g}"]) for lam in args.ewc_lambda]
    runs += [("er", [f"learner.mem_size={m}"]) for m in args.er_mem]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        print(f"mini suite, order {args.order}, seed {args.seed}, overrides {args.set or 'none (defaults)'}, "
              f"torch threads {args.threads}")
        print(f"{'run':34s}{'ACC':>8s}{'BWT':>9s}{'fit s':>8s}{'wall s':>8s}  final row")
        for strategy, extra in runs:
            cfg = resolve("mini", strategy=strategy, order=args.order, seed=args.seed,
                          overrides=list(args.set) + extra)
            t = time.perf_counter()
            result, _ = execute(cfg, out_dir=out, progress=False)
            wall = time.perf_counter() - t
            label = " ".join([strategy] + extra)
            last = " ".join(f"{v:.3f}" for v in result["acc_matrix"][-1])
            print(f"{label:34s}{result['acc']:8.4f}{result['bwt']:9.4f}{result['timings']['fit_s']:8.1f}"
                  f"{wall:8.1f}  {last}", flush=True)
            if strategy != "c-ft" and not extra:
                hp = {k: v for k, v in result["hyperparameters"].items() if k.startswith("learner.")}
                print(f"    {strategy} settings: {hp}")


if __name__ == "__main__":
    main()
