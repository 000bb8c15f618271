"""The ``cl-merge`` command: run, list, report, demo.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem and the fix), 1 internal failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from .errors import UserError

out = Console()
err = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cl-merge", description="Continual learning x model merging benchmark harness.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one strategy on one benchmark stream")
    r.add_argument("--benchmark", required=True)
    r.add_argument("--strategy")
    r.add_argument("--learner")
    r.add_argument("--merger")
    r.add_argument("--protocol", choices=["sequential", "independent"])
    r.add_argument("--order", default=None, help="task order id (benchmark-specific)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, default=Path("results/runs"))
    r.add_argument("--resume", action="store_true", help="continue from the last step checkpoint")
    r.add_argument("--quiet", action="store_true", help="no live progress")
    r.add_argument("overrides", nargs="*", metavar="key=value",
                   help="hyperparameters, e.g. learner.lr=1e-4 merger.alpha=0.5 benchmark.num_tasks=4")

    sub.add_parser("list", help="list benchmarks, strategies, learners and mergers")

    rep = sub.add_parser("report", help="tabulate result files (rich table, Markdown, CSV)")
    rep.add_argument("paths", nargs="+", type=Path)
    rep.add_argument("--markdown", type=Path, help="also write a Markdown table here")
    rep.add_argument("--csv", type=Path, help="also write a CSV here")

    d = sub.add_parser("demo", help="every registered strategy on the embedded mini suite, then a report")
    d.add_argument("--out", type=Path, default=Path("results/demo"))
    d.add_argument("--order", default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--strategies", nargs="*", help="default: all registered strategies")
    d.add_argument("--quiet", action="store_true")
    return p


def cmd_run(args) -> int:
    from .config import resolve
    from .report import matrix_table
    from .runner import execute

    config = resolve(args.benchmark, strategy=args.strategy, learner=args.learner, merger=args.merger,
                     protocol=args.protocol, order=args.order, seed=args.seed, overrides=args.overrides)
    result, path = execute(config, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    out.print(matrix_table(result))
    _summary(result, path)
    return 0


def _summary(result, path) -> None:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    out.print(f"[bold]{result['strategy']}[/] ({result['protocol']}) on {result['benchmark']} "
              f"[{len(result['tasks'])} tasks, order {result['order']}, seed {result['seed']}]: "
              f"ACC {pct(result['acc'])}  BWT {pct(result['bwt'])}  FWT {pct(result['fwt'])}  "
              f"norm. ACC {pct(result['normalized_acc'])}  ({result['timings']['wall_s']:.1f} s)")
    out.print(f"results: {path}")


def cmd_list(_args) -> int:
    from rich.table import Table

    from .config import list_hyperparameters
    from .registry import BENCHMARKS, LEARNERS, MERGERS, STRATEGIES

    t = Table(title="strategies")
    for c in ("name", "learner", "merger", "protocol", "hyperparameters", "description"):
        t.add_column(c)
    for name in STRATEGIES.names():
        s = STRATEGIES.get(name)
        t.add_row(name, s.learner, s.merger, s.protocol,
                  " ".join(f"{k}={v}" for k, v in s.hyperparameters.items()), s.description)
    out.print(t)
    for title, registry in (("learners", LEARNERS), ("mergers", MERGERS), ("benchmarks", BENCHMARKS)):
        t = Table(title=title)
        for c in ("name", "hyperparameters", "description"):
            t.add_column(c)
        for name in registry.names():
            cls = registry.get(name)
            t.add_row(name, " ".join(list_hyperparameters(cls)), cls.description)
        out.print(t)
    return 0


def cmd_report(args) -> int:
    from . import report
    from .io import write_text_atomic
    from .results import find_results, load_result

    files = find_results(args.paths)
    if not files:
        raise UserError(f"no result files under {', '.join(map(str, args.paths))}")
    rows = report.rows([load_result(f) for f in files])
    out.print(report.rich_table(rows))
    if args.markdown:
        write_text_atomic(args.markdown, report.markdown(rows))
        out.print(f"markdown: {args.markdown}")
    if args.csv:
        write_text_atomic(args.csv, report.csv_text(rows))
        out.print(f"csv: {args.csv}")
    return 0


def cmd_demo(args) -> int:
    from . import report
    from .config import resolve
    from .io import write_text_atomic
    from .registry import STRATEGIES
    from .runner import execute

    names = args.strategies or STRATEGIES.names()
    results = []
    for name in names:
        config = resolve("mini", strategy=name, order=args.order, seed=args.seed)
        out.rule(f"{name}")
        result, path = execute(config, out_dir=args.out, progress=not args.quiet)
        _summary(result, path)
        results.append(result)
    rows = report.rows(results)
    out.print(report.rich_table(rows, title="mini suite (ACC/BWT/FWT in %)"))
    write_text_atomic(args.out / "leaderboard.md", report.markdown(rows))
    write_text_atomic(args.out / "leaderboard.csv", report.csv_text(rows))
    out.print(f"wrote {len(results)} result files, leaderboard.md and leaderboard.csv to {args.out}")
    return 0


COMMANDS = {"run": cmd_run, "list": cmd_list, "report": cmd_report, "demo": cmd_demo}


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        err.print(f"cl-merge: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("cl-merge: interrupted; rerun with --resume to continue from the last finished step")
        return 130
    except Exception:
        traceback.print_exc()
        err.print("cl-merge: internal error (the traceback above); please report it", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
