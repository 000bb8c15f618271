"""Wall time of the Avalanche-driven learners against the plain `adam` learner, same budget.

On the mini suite's pre-trained model and tasks, each learner trains the first ``--tasks`` tasks of
one order in sequence (so EWC has a penalty and ER a buffer from task 2 on), with the same steps,
batch size and seeds. Prints seconds per fit (median over ``--repeats`` fresh runs, per task) and
milliseconds per iteration; ``avalanche`` is the template with no plugin, so avalanche / adam is
the template's own overhead. Also checks that ``avalanche`` and ``adam`` produce identical experts.
The one-off `import avalanche` time is reported apart.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/perf/avalanche_overhead.py [--steps 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cl_merge  # noqa: F401  (torchvision shim before open_clip / avalanche)
from cl_merge.learner import FitContext
from cl_merge.protocol import fit_seed
from cl_merge.registry import BENCHMARKS, LEARNERS

LEARNER_NAMES = ("adam", "avalanche", "ewc", "er")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100, help="iterations per task (mini default 100)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--order", default="1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    from cl_merge.strategies.avalanche_learner import avalanche

    avalanche()
    import_s = time.perf_counter() - t0

    bench = BENCHMARKS.get("mini")(num_tasks=max(args.tasks, 2))
    with tempfile.TemporaryDirectory() as cache:
        adapter = bench.build_model(cache_dir=Path(cache), device="cpu", eval_batch_size=256)
        stream = bench.build_stream(order=int(args.order), seed=0)
        tasks = stream.tasks[: args.tasks]
        for task in tasks:
            adapter.prepare(task)
        theta0 = adapter.get_state()
        budget = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr)

        times = {name: [[] for _ in tasks] for name in LEARNER_NAMES}
        experts = {}
        for rep in range(args.repeats):
            for name in LEARNER_NAMES:  # interleaved, so load changes hit every learner alike
                learner = LEARNERS.get(name)(**budget)
                start = dict(theta0)
                for i, task in enumerate(tasks, start=1):
                    ctx = FitContext(adapter=adapter, task=task, step=i, seed=fit_seed(0, task, i, "sequential"))
                    t = time.perf_counter()
                    start = learner.fit(start, ctx)
                    times[name][i - 1].append(time.perf_counter() - t)
                experts[name] = start

    same = max((experts["adam"][k] - experts["avalanche"][k]).abs().max().item() for k in theta0)
    print(f"mini suite, order {args.order}, tasks {[t.name for t in tasks]}; steps {args.steps}, batch "
          f"{args.batch_size}, lr {args.lr}; torch threads {args.threads}; {args.repeats} repeats (median)")
    print(f"import avalanche (once per process): {import_s:.2f} s")
    header = "learner".ljust(10) + "".join(f"task {i} s".rjust(11) for i in range(1, len(tasks) + 1))
    print(header + "ms/iter (all)".rjust(15) + "vs adam".rjust(9))
    base = sum(statistics.median(x) for x in times["adam"])
    for name in LEARNER_NAMES:
        med = [statistics.median(x) for x in times[name]]
        total = sum(med)
        print(name.ljust(10) + "".join(f"{m:11.3f}" for m in med)
              + f"{1000 * total / (args.steps * len(tasks)):15.2f}" + f"{total / base:9.3f}")
    print(f"max |adam expert − avalanche expert| after {len(tasks)} tasks: {same:.3g}")


if __name__ == "__main__":
    main()
