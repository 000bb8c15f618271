"""SAIM on the mini suite: ACC/BWT of saim, SA-BCD vs Adam under the same mergers, both readings of
SA-BCD's update rule, and the |Δθ| distribution of SA-BCD vs Adam experts.

Runs the real protocol loop (``cl_merge.runner.execute``) on one task order. Experts of the
independent protocol are cached per learner configuration, so each learner is trained once per seed
and shared by the mergers. Prints one table row per (learner, merger): ACC and BWT for each seed and
their mean.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/saim_mini.py [--seeds 0,1] [--order 1]
        [--tasks N] [--steps N] [--sequential] [--dtheta-tasks 3] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: see isotropic_merge.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import cl_merge  # noqa: E402,F401
from cl_merge.config import resolve  # noqa: E402
from cl_merge.runner import execute  # noqa: E402

# (label, learner, merger, overrides): SA-BCD in both readings vs Adam, under the isotropic merge
# (SAIM's) and task arithmetic (α = 0.3, C-TA's)
RUNS = [
    ("saim: sa_bcd[sam_adam] + isotropic", "sa_bcd", "isotropic", ["learner.update=sam_adam"]),
    ("saim: sa_bcd[literal] + isotropic", "sa_bcd", "isotropic", ["learner.update=literal"]),
    ("adam + isotropic", "adam", "isotropic", []),
    ("sa_bcd[sam_adam] + task_arithmetic", "sa_bcd", "task_arithmetic",
     ["learner.update=sam_adam", "merger.alpha=0.3"]),
    ("sa_bcd[literal] + task_arithmetic", "sa_bcd", "task_arithmetic", ["learner.update=literal", "merger.alpha=0.3"]),
    ("adam + task_arithmetic (c-ta)", "adam", "task_arithmetic", ["merger.alpha=0.3"]),
]
EXTRA = [
    ("sa_bcd[sam_adam, global] + isotropic", "sa_bcd", "isotropic", ["learner.update=sam_adam", "learner.scope=global"]),
    ("sam + isotropic", "sam", "isotropic", []),
    ("asam + isotropic", "asam", "isotropic", []),
]


def dtheta_summary(learner_name, overrides, n_tasks, order, seed, steps, cache_dir):
    """log10|θ_expert − θ0| quantiles over every trainable coordinate of the first ``n_tasks``
    independent experts, and the fraction of coordinates left exactly unchanged."""
    from cl_merge.benchmarks.mini.benchmark import MiniBenchmark
    from cl_merge.config import instantiate
    from cl_merge.learner import FitContext

    cfg = resolve("mini", learner=learner_name, merger="identity", protocol="independent", order=order,
                  seed=seed, overrides=overrides + ([f"learner.steps={steps}"] if steps else []))
    _, learner, _, _ = instantiate(cfg)
    bench = MiniBenchmark()
    adapter = bench.build_model(cache_dir, "cpu", 256)
    stream = bench.build_stream(order, seed)
    theta0 = adapter.get_state()
    logs, unchanged, total = [], 0, 0
    for task in stream.tasks[:n_tasks]:
        adapter.prepare(task)
        expert = learner.fit(theta0, FitContext(adapter=adapter, task=task, step=1, seed=seed))
        delta = torch.cat([(expert[k] - theta0[k]).abs().reshape(-1) for k in theta0])
        unchanged += int((delta == 0).sum())
        total += delta.numel()
        logs.append(torch.log10(delta[delta > 0].double()))
    logs = torch.cat(logs)
    qs = torch.quantile(logs[torch.randperm(len(logs), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                        torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return qs.tolist(), unchanged / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--order", default="1")
    ap.add_argument("--tasks", type=int, default=None, help="first N tasks of the order (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task (default: the suite's)")
    ap.add_argument("--sequential", action="store_true", help="also run saim under the sequential protocol")
    ap.add_argument("--extra", action="store_true", help="also global selection scope, SAM and ASAM")
    ap.add_argument("--dtheta-tasks", type=int, default=3, help="experts used for the |Δθ| summary (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="saim_mini_"))
    cache = out / ".cache"
    common = [f"run.cache_dir={cache}", f"run.threads={args.threads}"]
    if args.tasks:
        common.append(f"benchmark.num_tasks={args.tasks}")
    if args.steps:
        common.append(f"learner.steps={args.steps}")
    runs = [(label, lrn, mrg, ovr, "independent") for label, lrn, mrg, ovr in RUNS + (EXTRA if args.extra else [])]
    if args.sequential:
        runs += [("saim sequential: sa_bcd[sam_adam] + isotropic", "sa_bcd", "isotropic",
                  ["learner.update=sam_adam"], "sequential"),
                 ("adam + isotropic, sequential", "adam", "isotropic", [], "sequential")]
    print(f"mini suite, order {args.order}, seeds {seeds}, threads {args.threads}, results in {out}", flush=True)
    rows = []
    for label, lrn, mrg, ovr, protocol in runs:
        accs, bwts, nacc, expert = [], [], [], []
        t0 = time.perf_counter()
        for seed in seeds:
            cfg = resolve("mini", learner=lrn, merger=mrg, protocol=protocol, order=args.order, seed=seed,
                          overrides=common + ovr)
            result, _ = execute(cfg, out_dir=out, progress=False)
            accs.append(result["acc"])
            bwts.append(result["bwt"])
            nacc.append(result["normalized_acc"])
            expert.append(statistics.mean(result["expert_acc"]))
        row = (f"{label:48s} ACC {statistics.mean(accs):.3f} ({', '.join(f'{a:.3f}' for a in accs)})  "
               f"BWT {statistics.mean(bwts):+.3f} ({', '.join(f'{b:+.3f}' for b in bwts)})  "
               f"norm.ACC {statistics.mean(nacc):.3f}  expert {statistics.mean(expert):.3f}  "
               f"[{protocol}, {time.perf_counter() - t0:.0f} s]")
        rows.append(row)
        print(row, flush=True)
    if args.dtheta_tasks:
        print(f"\n|Δθ| of independent experts (first {args.dtheta_tasks} tasks, seed {seeds[0]}): "
              "quantiles 5/25/50/75/95% of log10|Δθ| over changed coordinates; share unchanged", flush=True)
        for label, lrn, ovr in [("adam", "adam", []), ("sa_bcd[sam_adam]", "sa_bcd", ["learner.update=sam_adam"]),
                                ("sa_bcd[literal]", "sa_bcd", ["learner.update=literal"])]:
            qs, zero = dtheta_summary(lrn, ovr, args.dtheta_tasks, args.order, seeds[0], args.steps, cache)
            print(f"  {label:18s} log10|Δθ| {' / '.join(f'{q:+.2f}' for q in qs)}   unchanged {zero:.1%}", flush=True)


if __name__ == "__main__":
    main()
