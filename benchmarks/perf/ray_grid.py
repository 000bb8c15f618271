"""Wall time of a mini-suite grid on the local runner vs the Ray engine, and expert trainings saved.

Runs the same grid (strategies x orders, mini suite) twice from scratch, each in its own results folder
(own expert and head caches): once with the local sequential runner in this process (torch 1 thread),
once on a local Ray instance started here with --workers CPUs (one CPU and one torch thread per run).
Then checks that both wrote the same results (everything but timings/environment/expert provenance)
and counts expert trainings: run steps that read an independent expert (= trainings if nothing were
shared), distinct experts (what sharing trains), and what each engine actually trained.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/ray_grid.py                # all strategies x 5 orders, FAST
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/ray_grid.py --set benchmark.num_tasks=9 learner.steps=100 ...

Default overrides are the tests' FAST mini settings (3 tasks, 96 train / 32 val / 96 test images per
task, 15 steps); pass --set to change them (--set with no values = the mini defaults: 9 tasks, 100 steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

import cl_merge  # noqa: F401  (torchvision shim before open_clip)
from cl_merge import leaderboard as lb
from cl_merge import ray_engine
from cl_merge.config import resolve
from cl_merge.registry import STRATEGIES
from cl_merge.runner import result_path

FAST = ["benchmark.num_tasks=3", "benchmark.n_train=96", "benchmark.n_val=32", "benchmark.n_test=96",
        "learner.steps=15"]
VOLATILE = {"timings", "environment", "peak_memory_bytes", "git_commit", "expert_source"}


def load(path: Path):
    return json.loads(path.read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    ap.add_argument("--orders", nargs="+", default=["1", "2", "3", "4", "5"])
    ap.add_argument("--set", nargs="*", default=None, help="overrides for every run (default: FAST)")
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--out", default=None, help="keep the two results folders here (default: temporary)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = list(FAST if args.set is None else args.set) + ["run.threads=1"]
    strategies = args.strategies or STRATEGIES.names()
    configs = [resolve("mini", strategy=s, order=o, overrides=overrides) for s in strategies for o in args.orders]
    print(f"grid: {len(strategies)} strategies x {len(args.orders)} orders = {len(configs)} runs; overrides "
          f"{' '.join(overrides)}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        local_out, ray_out = root / "local", root / "ray"

        t = time.perf_counter()
        lb.run_grid(configs, local_out, progress=False)
        local_s = time.perf_counter() - t
        print(f"local runner: {local_s:.1f} s (load average {os.getloadavg()[0]:.1f})", flush=True)

        import ray

        t = time.perf_counter()
        ray.init(num_cpus=args.workers, logging_level=logging.WARNING)
        init_s = time.perf_counter() - t
        outcome = ray_engine.run_grid(configs, ray_out, resources={"num_cpus": 1, "num_gpus": 0, "max_retries": 3},
                                      progress=False)
        ray.shutdown()
        print(f"Ray, {args.workers} workers: {outcome.wall_s:.1f} s (+ {init_s:.1f} s ray.init; load average "
              f"{os.getloadavg()[0]:.1f}); {outcome.ran} ran, {len(outcome.failed)} failed", flush=True)
        for run_id, error in outcome.failed.items():
            print(f"  failed {run_id}: {error}")

        same = 0
        local_trained = 0
        for config in configs:
            a, b = load(result_path(config, local_out)), load(result_path(config, ray_out))
            same += {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
            if ray_engine.shares_experts(config):
                local_trained += a["expert_source"].count("trained")
        print(f"identical results (timings/environment/expert provenance aside): {same}/{len(configs)}")
        print(f"independent expert reads: {outcome.expert_uses} (trainings with no sharing); distinct experts: "
              f"{outcome.experts_planned}; trained by Ray's expert tasks: {outcome.experts_trained}, inside Ray runs: "
              f"{outcome.trained_in_runs}; trained by the local runner (sequential cache): {local_trained}; "
              f"saved by sharing: {outcome.expert_uses - outcome.experts_planned}")
        print(f"speed-up Ray vs local: {local_s / outcome.wall_s:.2f}x (run phase), "
              f"{local_s / (outcome.wall_s + init_s):.2f}x including ray.init")
        print(json.dumps({"runs": len(configs), "local_s": round(local_s, 1), "ray_s": round(outcome.wall_s, 1),
                          "ray_init_s": round(init_s, 1), "identical": same, "expert_uses": outcome.expert_uses,
                          "distinct_experts": outcome.experts_planned, "ray_trained": outcome.experts_trained,
                          "local_trained": local_trained}))


if __name__ == "__main__":
    main()
