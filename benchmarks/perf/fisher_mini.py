"""Empirical Fisher diagonal on the mini suite's CLIP tower: time per sample and peak memory by chunk size.

``cl_merge.fisher.fisher_diagonal`` (torch.func vmap over chunks) against a plain loop of one
backward pass per sample, on ``--samples`` training samples of one mini task. Peak memory is the
resident-set high-water mark above the level before the call, sampled every 2 ms by a thread
(CPU torch allocations are invisible to tracemalloc); each configuration runs once after a warm-up.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/perf/fisher_mini.py [--samples 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import torch

import cl_merge  # noqa: F401
from cl_merge.fisher import FisherSettings, fisher_diagonal, subsample
from cl_merge.registry import BENCHMARKS

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def peak_during(fn):
    """(result, seconds, peak RSS above the starting level in bytes)."""
    start, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    return out, seconds, max(0, max(peak[0], rss()) - start)


def loop_fisher(adapter, task, indices):
    params = adapter.trainable_parameters()
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in indices:
        image, label = task.train[i]
        for p in params.values():
            p.grad = None
        adapter.loss((image.unsqueeze(0), label.reshape(1)), task).backward()
        for n, p in params.items():
            acc[n] += p.grad ** 2
    return {n: v / len(indices) for n, v in acc.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = BENCHMARKS.get("mini")()
    with tempfile.TemporaryDirectory() as cache:
        adapter = bench.build_model(cache, "cpu", 64)
        task = bench.build_task(bench.task_names(1)[0])
        adapter.prepare(task)
        n_params = sum(p.numel() for p in adapter.trainable_parameters().values())
        print(f"mini CLIP tower: {n_params / 1e3:.0f}k parameters (Fisher diagonal {4 * n_params / 1e6:.2f} MB), "
              f"{args.samples} of {len(task.train)} training samples of '{task.name}'; threads {args.threads}; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        fisher_diagonal(adapter, task, settings=FisherSettings(fraction=0.0, min_samples=8))  # warm-up
        ref = None
        indices = subsample(len(task.train), 0.0, args.samples, 0)
        ref, secs, mem = peak_during(lambda: loop_fisher(adapter, task, indices))
        print(f"plain per-sample backward loop: {1e3 * secs / args.samples:.1f} ms/sample, "
              f"peak +{mem / 1e6:.1f} MB", flush=True)
        for chunk in (1, 8, 32):
            settings = FisherSettings(fraction=0.0, min_samples=args.samples, chunk_size=chunk, batch_size=64)
            est, secs, mem = peak_during(lambda: fisher_diagonal(adapter, task, settings=settings))
            err = max(float((est.diagonal[n] - ref[n]).norm() / ref[n].norm()) for n in ref if ref[n].norm() > 0)
            print(f"vmap, chunk {chunk:>2}: {1e3 * secs / args.samples:.1f} ms/sample, peak +{mem / 1e6:.1f} MB "
                  f"(chunk × parameters × 4 B = {chunk * n_params * 4 / 1e6:.1f} MB); "
                  f"max rel. difference to the loop {err:.1e}; load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
