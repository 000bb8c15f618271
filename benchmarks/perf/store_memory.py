"""Memory budgets of the protocol loop's parameter stores.

1. ``disk``: T merge steps of a synthetic model (``--tensors`` float32 matrices of ``--dim`` × ``--dim``
   plus a bias each) through the on-disk store (``cl_merge.store.DiskStorage``) and the one merge
   executor, for each merger; one subprocess per (merger, T) so its peak is its own. A sampler thread
   reads /proc/self/status every 5 ms: the anonymous resident memory (RssAnon: tensors the process
   allocated) and the file-backed part (RssFile: safetensors pages mapped while read, which the
   kernel can drop at any time). Budget: peak RssAnon above the import baseline ≈ the largest tensor
   × a small constant, whatever T (no model copy is ever built: the evaluated model of a real run is
   the one copy on top). ``--fixed-mmap-threshold`` makes glibc return every freed tensor to the
   system at once, so RssAnon shows live memory rather than the allocator's retained heap.
2. ``mini``: an in-memory mini-suite run (``cl_merge.runner.execute``) with T tasks; peak RSS
   (``peak_memory_bytes`` of the results) for T = 3 and T = 9 should be about equal (O(1) in T).

    python benchmarks/perf/store_memory.py disk [--dim 2048 --tensors 12 --steps 2,5]
    python benchmarks/perf/store_memory.py mini [--strategies c-ta,opcm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1 << 20
DISK_MERGERS = {"task_arithmetic": {}, "ties": {}, "ties-fb": {"variant": "fusionbench"}, "magmax": {},
                "opcm": {}, "isotropic": {}}


class RssSampler:
    """Peak RssAnon / RssFile (bytes) of this process, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_synthetic(root: Path, dim: int, tensors: int, experts: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(tensors):
        base[f"layer{i}.weight"] = torch.randn(dim, dim, generator=g) / dim ** 0.5
        base[f"layer{i}.bias"] = torch.zeros(dim)
    save_file(base, str(root / "base.safetensors"))
    for e in range(experts):
        save_file({k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(root / f"expert{e}.safetensors"))
        # one expert file at a time in memory while writing
    del base


def disk_child(root: Path, merger_key: str, steps: int) -> dict:
    """One subprocess: ``steps`` merge steps of ``merger_key`` through the on-disk store."""
    import torch

    import cl_merge.strategies  # noqa: F401  (registration)
    from cl_merge.merge_engine import MergeContext, StepInputs, merge_step
    from cl_merge.registry import MERGERS
    from cl_merge.store import DiskStorage
    from cl_merge.streaming import TensorSource

    torch.set_num_threads(1)
    names = list(TensorSource(root / "base.safetensors"))
    work = Path(tempfile.mkdtemp(dir=root))
    storage = DiskStorage(root / "base.safetensors", work, names=names, model_names=names)
    name = merger_key.split("-")[0]
    merger = MERGERS.get(name)(**DISK_MERGERS[merger_key])
    merger.reset()
    baseline = RssSampler.read()
    base = storage.theta0(None)
    previous, state = base, storage.empty_state()
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        for t in range(1, steps + 1):
            expert = TensorSource(root / f"expert{t - 1}.safetensors", names=names, dtype=torch.float32)
            deployed_w, state_w, scratch_w, release = storage.writers(t)
            result = merge_step(merger, StepInputs(base, previous, expert, base, t), state,
                                deployed_writer=deployed_w, state_writer=state_w, scratch_writer=scratch_w,
                                release=release, context=MergeContext(step=t))
            storage.discard(*(s for s in (previous, state) if s is not base))
            previous, state = result.deployed, result.state
    largest = max(math.prod(base.spec(n)[1]) * 4 for n in names)
    return {"merger": merger_key, "steps": steps, "seconds": time.perf_counter() - t0,
            "anon_peak_over_baseline_mib": (sampler.peak["RssAnon"] - baseline["RssAnon"]) / MIB,
            "file_peak_mib": sampler.peak["RssFile"] / MIB, "largest_tensor_mib": largest / MIB}


def run_disk(args) -> None:
    steps = [int(s) for s in args.steps.split(",")]
    env = dict(os.environ)
    if args.fixed_mmap_threshold:
        # glibc raises its mmap threshold after each freed large block (up to 32 MiB), then serves
        # tensors below it from the heap, which it may not give back: RssAnon then counts freed memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    print(f"allocator: {'MALLOC_MMAP_THRESHOLD_=1MiB (fixed)' if args.fixed_mmap_threshold else 'glibc default'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, args.dim, args.tensors, max(steps))
        model_mib = sum(f.stat().st_size for f in [root / "base.safetensors"]) / MIB
        print(f"synthetic model: {args.tensors} × ({args.dim}×{args.dim} + {args.dim}) float32 = {model_mib:.0f} MiB "
              f"(largest tensor {args.dim * args.dim * 4 / MIB:.0f} MiB)")
        print(f"{'merger':<16}{'T':>3}{'anon peak − baseline (MiB)':>28}{'× largest':>11}{'file-backed peak (MiB)':>24}"
              f"{'s':>8}")
        for key in args.mergers.split(","):
            for T in steps:
                out = subprocess.run([sys.executable, __file__, "disk-child", str(root), key, str(T)],
                                     capture_output=True, text=True, check=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{key:<16}{T:>3}{r['anon_peak_over_baseline_mib']:>28.1f}"
                      f"{r['anon_peak_over_baseline_mib'] / r['largest_tensor_mib']:>11.2f}"
                      f"{r['file_peak_mib']:>24.1f}{r['seconds']:>8.1f}", flush=True)


def mini_child(strategy: str, num_tasks: int, out: Path) -> dict:
    from cl_merge.config import resolve
    from cl_merge.runner import execute

    overrides = [f"benchmark.num_tasks={num_tasks}", "benchmark.n_train=64", "benchmark.n_val=32",
                 "benchmark.n_test=48", "learner.steps=4", "run.sar_store=true", "run.threads=1"]
    result, _ = execute(resolve("mini", strategy=strategy, overrides=overrides), out_dir=out, progress=False)
    return {"strategy": strategy, "T": num_tasks, "peak_rss_mib": result["peak_memory_bytes"] / MIB,
            "state_mib": (result["parameter_store"]["per_step"][-1]["state_bytes"] or 0) / MIB,
            "mergeable_mib": result["parameter_store"]["mergeable_bytes"] / MIB}


def run_mini(args) -> None:
    print(f"{'strategy':<10}{'T':>3}{'peak RSS (MiB)':>16}{'merger state (MiB)':>20}{'mergeable (MiB)':>17}")
    for strategy in args.strategies.split(","):
        for T in (3, 9):
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, __file__, "mini-child", strategy, str(T), tmp],
                                     capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{strategy:<10}{T:>3}{r['peak_rss_mib']:>16.1f}{r['state_mib']:>20.2f}{r['mergeable_mib']:>17.2f}",
                  flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "disk-child":
        print(json.dumps(disk_child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "mini-child":
        print(json.dumps(mini_child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("disk")
    d.add_argument("--dim", type=int, default=2048)
    d.add_argument("--tensors", type=int, default=12)
    d.add_argument("--steps", default="2,5")
    d.add_argument("--mergers", default=",".join(DISK_MERGERS))
    d.add_argument("--fixed-mmap-threshold", action="store_true",
                   help="children allocate every tensor ≥ 1 MiB with mmap (RssAnon = live memory)")
    m = sub.add_parser("mini")
    m.add_argument("--strategies", default="c-ta,opcm")
    args = parser.parse_args()
    run_disk(args) if args.what == "disk" else run_mini(args)


if __name__ == "__main__":
    main()
