"""How close `cl-merge plan`'s time estimate is to a real run: calibrate this machine (the plan's own
measurement), estimate a small mini grid, run that grid for real in the same process, and print the
ratio estimate / measured wall time, phase by phase (the phases from the result files' timings).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/perf/plan_accuracy.py
        [--steps 40] [--num-tasks 3] [--strategies c-ft c-ta opcm saim ewc] [--repeats 1] [--clock cpu|wall]

``--clock cpu`` (default) times calibration and run by this process's CPU time (one thread): on a
shared machine whose load changes between calibration and run, that is the time a dedicated core would
take; ``--clock wall`` compares wall times, phase by phase, on an idle machine.

The counts themselves are checked exactly in tests/test_plan.py; this script is the timing check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def grid_text(strategies, steps: int, num_tasks: int) -> str:
    names = ", ".join(f'"{s}"' for s in strategies)
    return (f'benchmark = "mini"\nstrategies = [{names}]\norders = [1]\nseeds = [0]\nnum_tasks = [{num_tasks}]\n'
            f'overrides = ["learner.steps={steps}", "run.threads=1"]\nout = "runs"\n')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--num-tasks", type=int, default=3)
    p.add_argument("--strategies", nargs="+", default=["c-ft", "c-ta", "opcm", "saim", "ewc"])
    p.add_argument("--repeats", type=int, default=1, help="calibrate + run this many times (fresh directories)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = p.parse_args()
    from cl_merge import calibration

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    calibration.CLOCK = clock

    import torch

    torch.set_num_threads(1)
    from cl_merge import leaderboard as lb
    from cl_merge.cli_plan import build_plan

    ratios = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            grid = Path(tmp) / "grid.toml"
            grid.write_text(grid_text(args.strategies, args.steps, args.num_tasks))
            t0 = clock()
            plan = build_plan([grid], None, measure=True, save_calibration=None)
            calibrate_s = clock() - t0
            estimate = plan["total"]["total_seconds"]
            configs = lb.expand(lb.load_grid(grid))
            t0, w0 = clock(), time.perf_counter()
            outcome = lb.run_grid(configs, Path(tmp) / "runs", progress=False)
            wall, real_wall = clock() - t0, time.perf_counter() - w0
            measured = {"setup": 0.0, "fit": 0.0, "eval": 0.0, "merge": 0.0, "sar": 0.0}
            for r in outcome.results:
                t = r["timings"]
                measured["setup"] += t["setup_s"]
                measured["fit"] += t["fit_s"]
                measured["eval"] += t["eval_s"] + (t["pretrained_eval_s"] or 0.0)
                measured["merge"] += t["merge_s"]
                measured["sar"] += t["sar_s"]
            print(f"repeat {repeat + 1}: {len(configs)} runs, T={args.num_tasks}, {args.steps} steps per fit; "
                  f"calibration took {calibrate_s:.1f} s ({args.clock} clock); the run {real_wall:.1f} s wall")
            print(f"  {'phase':<8} {'estimate s':>11} {'measured s':>11} {'ratio':>6}")
            if args.clock == "wall":  # the result files' per-phase timings are wall times
                for phase, value in measured.items():
                    est = plan["total"]["seconds"][phase]
                    print(f"  {phase:<8} {est:>11.1f} {value:>11.1f} {est / value if value else float('nan'):>6.2f}")
            print(f"  {'total':<8} {estimate:>11.1f} {wall:>11.1f} {estimate / wall:>6.2f}   "
                  f"(measured: the grid run, {args.clock} clock)")
            ratios.append(estimate / wall)
    print(f"estimate / measured ({args.clock} clock): {', '.join(f'{r:.2f}' for r in ratios)}"
          + (f" (median {statistics.median(ratios):.2f})" if len(ratios) > 1 else ""))


if __name__ == "__main__":
    main()
