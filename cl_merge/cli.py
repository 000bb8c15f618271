"""The ``cl-merge`` command: run, list, report, demo, leaderboard, plan, plot.

Exit codes: 0 success, 2 bad input or an unwritable/unreadable path (one line on stderr naming the problem
and the fix), 3 the run diverged (a non-finite loss, gradient norm or weight; one line naming the step,
task and quantity), 1 internal failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from . import __version__
from .console import make_console
from .errors import GridFailed, UserError
from .registry import PROTOCOLS

# wide and plain when the output is a file or a pipe: a log never shows a cut number or name
out = make_console()
err = make_console(stderr=True)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless it has none (None/False) or says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and shown defaults; subcommand parsers inherit both."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        err.print(f"{self.prog}: error: {message} (see {self.prog} --help)", markup=False, highlight=False,
                  soft_wrap=True)
        raise SystemExit(2)


FIGURE_OUT_HELP = "output file; the extension picks the format: .png (200 dpi), .pdf or .svg"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cl-merge", description="Continual learning x model merging benchmark harness.")
    p.add_argument("--version", action="version", version=f"cl-merge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one strategy on one benchmark stream",
                       description="Run one strategy (or --learner with --merger) on one benchmark stream and "
                                   "write its results JSON.")
    r.add_argument("--benchmark", required=True, help="benchmark name (cl-merge list), e.g. mini")
    r.add_argument("--strategy", help="registered strategy (cl-merge list); or give --learner and --merger")
    r.add_argument("--learner", help="learner name, with --merger instead of --strategy")
    r.add_argument("--merger", help="merger name, with --learner instead of --strategy")
    r.add_argument("--protocol", choices=list(PROTOCOLS),
                   help="default: the strategy's, else independent for mergers that support it")
    r.add_argument("--order", default=None, help="task order id (benchmark-specific; default: the benchmark's)")
    r.add_argument("--seed", type=int, default=0, help="run seed")
    r.add_argument("--out", type=Path, default=Path("results/runs"), help="results directory")
    r.add_argument("--resume", action="store_true", help="continue from the last step checkpoint")
    r.add_argument("--quiet", action="store_true", help="no live progress")
    r.add_argument("overrides", nargs="*", metavar="key=value",
                   help="hyperparameters, e.g. learner.lr=1e-4 merger.alpha=0.5 benchmark.num_tasks=4 "
                        "(cl-merge list shows every key)")

    sub.add_parser("list", help="list benchmarks, strategies, learners, mergers and run.* settings",
                   description="Every registered component with its hyperparameters and defaults.")

    rep = sub.add_parser("report", help="tabulate result files (rich table, Markdown, CSV)",
                         description="Tabulate result files; runs that differ only in hyperparameters get "
                                     "a column naming the difference.")
    rep.add_argument("paths", nargs="+", type=Path, help="result files, directories (searched recursively), or grid files (.toml: exactly "
                                                         "that grid's runs)")
    rep.add_argument("--markdown", type=Path, help="also write a Markdown table here")
    rep.add_argument("--csv", type=Path, help="also write a CSV here")
    rep.add_argument("--html", type=Path, help="also write a self-contained HTML report here (sortable tables, "
                                               "heatmaps, curves; no network needed)")

    d = sub.add_parser("demo", help="every registered strategy on the embedded mini suite, then a report",
                       description="Every registered strategy (or --strategies) on the offline mini suite, then a "
                                   "report. key=value overrides apply to every run, e.g. "
                                   "benchmark.num_tasks=2 learner.steps=5 for a tiny demo.")
    d.add_argument("--out", type=Path, default=Path("results/demo"), help="results directory")
    d.add_argument("--order", default=None, help="task order id (default: the mini suite's)")
    d.add_argument("--seed", type=int, default=0, help="run seed")
    d.add_argument("--strategies", nargs="*", help="these strategies only (default: every registered one)")
    d.add_argument("--quiet", action="store_true", help="no live progress")
    d.add_argument("--jobs", type=int, default=None,
                   help="worker processes running strategies side by side (default: 2 when the machine has "
                        "2+ cores, else 1); 1 shows each run's live progress")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings for every run, e.g. benchmark.num_tasks=2 learner.steps=5 run.sar=false; "
                        "a key a strategy's components lack is an error")

    lb = sub.add_parser("leaderboard", help="run a grid (strategies x orders x task counts), skipping finished "
                                            "runs, then report mean ± std over orders")
    lb.add_argument("config", type=Path, help="grid file (TOML), e.g. results/leaderboard_mini.toml")
    lb.add_argument("--report-only", action="store_true", help="aggregate existing result files, run nothing")
    lb.add_argument("--markdown", type=Path, help="write the Markdown leaderboard here (default: the grid's)")
    lb.add_argument("--csv", type=Path, help="write the CSV leaderboard here (default: the grid's)")
    lb.add_argument("--reference", type=Path, help="the SAIM Table 1 CSV (default: results/reference/…)")
    lb.add_argument("--quiet", action="store_true", help="no live progress inside runs")
    lb.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: one run after another in this process (default); ray: every run a Ray task "
                         "with the grid's [ray] resources, shared experts trained once (pip install -e \".[ray]\")")
    lb.add_argument("--address", help="with --engine ray: the cluster to join (auto, ray://HOST:10001, HOST:6379); "
                                      "default: RAY_ADDRESS, else a new local Ray instance")

    pn = sub.add_parser("plan", help="a grid's cost before launching it: runs, experts, fine-tuning steps, "
                                     "evaluations, merges, SAR, and device-hours per phase")
    pn.add_argument("grids", nargs="+", type=Path, metavar="GRID.toml",
                    help="grid file(s); several are planned together (e.g. one per backbone)")
    pn.add_argument("--calibration", type=Path, help="per-phase seconds per model (JSON/TOML, e.g. written on "
                                                     "another device with --save-calibration); default: measure here")
    pn.add_argument("--save-calibration", type=Path, metavar="FILE",
                    help="measure this machine's per-phase costs for the grids' models and write them here")
    pn.add_argument("--counts-only", action="store_true", help="counts only, no calibration (fast)")
    pn.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="what calibration measures: wall time (default), or this process's CPU time (a CPU "
                         "shared with other work: the time one dedicated core would take)")
    pn.add_argument("--json", type=Path, metavar="OUT", help="also write the plan as JSON")

    pl = sub.add_parser("plot", help="analysis figures (PNG, PDF or SVG): matrix, curves, delta-hist, disentanglement")
    kinds = pl.add_subparsers(dest="kind", required=True)
    m = kinds.add_parser("matrix", help="accuracy-matrix heatmap of one result file (SAIM Fig. 4)")
    m.add_argument("result", type=Path, help="a result file, or a directory or grid file (.toml) with "
                                                  "--strategy/--order/--num-tasks")
    m.add_argument("--strategy", help="pick the run of this strategy from a directory")
    m.add_argument("--order", help="pick the run of this order from a directory")
    m.add_argument("--num-tasks", type=int, help="pick the run with this many tasks from a directory")
    m.add_argument("--out", type=Path, required=True, help=FIGURE_OUT_HELP)
    c = kinds.add_parser("curves", help="ACC over seen tasks and SAR vs number of tasks (SAIM Fig. 6)")
    c.add_argument("paths", nargs="+", type=Path, help="result files, directories, or grid files (.toml: "
                                                       "exactly that grid's runs)")
    c.add_argument("--strategies", nargs="+", help="only these strategies (default: all found)")
    c.add_argument("--out", type=Path, required=True, help=FIGURE_OUT_HELP)
    for name, helptext in (("delta-hist", "log10 |Δθ| histograms of learners' experts (SAIM Fig. 2)"),
                           ("disentanglement", "weight-disentanglement error ξ(α1, α2) (SAIM Eq. 13/35, Fig. 3/5)")):
        k = kinds.add_parser(name, help=helptext)
        k.add_argument("--benchmark", default="mini", help="benchmark the experts are trained on")
        k.add_argument("--learners", nargs="+", default=["adam", "sa_bcd"],
                       help="one panel per learner (default: adam sa_bcd)")
        k.add_argument("--order", default=None, help="task order id (default: the benchmark's)")
        k.add_argument("--seed", type=int, default=0, help="expert seed")
        k.add_argument("--out", type=Path, required=True, help=FIGURE_OUT_HELP)
        k.add_argument("--data", type=Path, help="also write the plotted numbers as JSON here")
        k.add_argument("--quiet", action="store_true", help="no live progress")
        if name == "delta-hist":
            k.add_argument("--tasks", nargs="+", help="task names or stream positions (default: the first 3)")
        else:
            k.add_argument("--pair", nargs=2, default=["1", "2"], metavar=("TASK1", "TASK2"),
                           help="task names or stream positions (default: 1 2)")
            k.add_argument("--others", choices=["absent", "fixed"], default="absent",
                           help="other tasks' vectors absent (Eq. 13) or fixed (Eq. 35)")
            k.add_argument("--others-alpha", default="auto",
                           help="coefficient of the fixed other tasks: a number, or auto (validation search)")
            k.add_argument("--grid", type=int, default=21, help="points per axis over [-0.5, 1.5]")
            k.add_argument("--eval-n", type=int, default=128, help="test examples per task")
        k.add_argument("overrides", nargs="*", metavar="key=value",
                       help="benchmark.*, learner.* (shared by the learners) and run.* settings; "
                            "run.cache_dir=DIR reuses a leaderboard's experts")
    return p


def cmd_run(args) -> int:
    from .config import resolve
    from .runner import execute

    config = resolve(args.benchmark, strategy=args.strategy, learner=args.learner, merger=args.merger,
                     protocol=args.protocol, order=args.order, seed=args.seed, overrides=args.overrides)
    result, path = execute(config, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    show_run(result, path)
    return 0


def show_run(result, path) -> None:
    """A finished run: its accuracy matrix, then the summary line."""
    from .report import matrix_table

    out.print(matrix_table(result))
    _summary(result, path)


def _summary(result, path) -> None:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    if result.get("diverged"):
        d = result.get("divergence") or {}
        out.print(f"[bold]{result['strategy']}[/] ({result['protocol']}) on {result['benchmark']}: [red]diverged[/] at "
                  f"step {d.get('step')} ({d.get('task')}): {d.get('quantity')} is {d.get('value')}; recorded as "
                  "diverged (run.on_divergence=record)")
        out.print(f"results: {path}")
        return
    from rich.columns import Columns
    from rich.text import Text

    from .normalization import independent_normalized_acc

    timings = result["timings"]
    train = f", {timings['train_s']:.1f} s training" if timings.get("train_s") is not None else ""
    items = [f"ACC {pct(result['acc'])}", f"BWT {pct(result['bwt'])}", f"FWT {pct(result['fwt'])}",
             f"norm. ACC {pct(independent_normalized_acc(result))} (÷ independent experts)",
             f"own-expert norm. ACC {pct(result['normalized_acc'])}",
             f"SAR {_sar(result)}", f"({timings['wall_s']:.1f} s{train})"]
    head = (f"[bold]{result['strategy']}[/] ({result['protocol']}) on {result['benchmark']} "
            f"[{len(result['tasks'])} tasks, order {result['order']}, seed {result['seed']}]:")
    if out.is_terminal:  # each "label value" stays on one line when the terminal is narrow
        out.print(head)
        out.print(Columns([Text(i, no_wrap=True) for i in items], padding=(0, 2)))
    else:  # a log: one line
        out.print(head + " " + "  ".join(items), soft_wrap=True, highlight=False)
    out.print(f"results: {path}", soft_wrap=True)


SAR_SCOPE_LABELS = {"seen_tasks": "seen tasks", "current_task": "current task", "all_tasks": "all tasks"}


def _sar(result) -> str:
    sar = (result.get("sar") or [None])[-1]
    if sar is None:
        return "–"
    scope = result.get("sar_scope")
    return f"{sar:.3f} ({SAR_SCOPE_LABELS.get(scope, scope or 'scope not recorded')})"


def cmd_list(_args) -> int:
    from rich.table import Table

    from .config import RunSettings, list_hyperparameters, supported_protocols
    from .registry import BENCHMARKS, LEARNERS, MERGERS, STRATEGIES

    def table(title, columns):
        t = Table(title=title)
        for c in columns:  # fold, never cut: every hyperparameter is shown whole
            t.add_column(c, overflow="fold")
        return t

    t = table("strategies", ("name", "learner", "merger", "protocol", "hyperparameters", "description"))
    for name in STRATEGIES.names():
        s = STRATEGIES.get(name)
        t.add_row(name, s.learner, s.merger, s.protocol,
                  " ".join(f"{k}={v}" for k, v in s.hyperparameters.items()), s.description)
    out.print(t)
    for title, registry in (("learners", LEARNERS), ("mergers", MERGERS), ("benchmarks", BENCHMARKS)):
        columns = ("name", "protocols", "hyperparameters", "description") if registry is MERGERS else \
            ("name", "hyperparameters", "description")
        t = table(title, columns)
        for name in registry.names():
            cls = registry.get(name)
            protocols = [", ".join(supported_protocols(cls))] if registry is MERGERS else []
            t.add_row(name, *protocols, " ".join(list_hyperparameters(cls)), cls.description)
        out.print(t)
    t = table("run settings (run.KEY=VALUE, every run)", ("setting", "default", "meaning"))
    for key, default, meaning in run_settings_rows(RunSettings):
        t.add_row(f"run.{key}", default, meaning)
    out.print(t)
    return 0


def run_settings_rows(cls):
    """(key, default, meaning) per run.* setting; the meaning is the comment beside its field."""
    import inspect
    import re

    comments = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        lines = []
    pending = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+)\s*:[^=]+=\s*[^#]*(?:#\s*(.*))?$", stripped)
        if match:
            comments[match.group(1)] = " ".join(pending + ([match.group(2)] if match.group(2) else []))
        pending = []
    defaults = cls.defaults()
    return [(k, repr(defaults.get(k)), comments.get(k, "")) for k in cls.hyperparameters()]


def cmd_report(args) -> int:
    from . import report
    from .io import write_text_atomic
    from .run_sets import load_runs

    results = load_runs(args.paths)  # result files, directories, grid files (.toml: that grid's runs)
    if not results:
        raise UserError(f"no result files under {', '.join(map(str, args.paths))}")
    rows = report.rows(results)
    out.print(report.rich_table(rows))
    if args.markdown:
        write_text_atomic(args.markdown, report.markdown(rows))
        out.print(f"markdown: {args.markdown}")
    if args.csv:
        write_text_atomic(args.csv, report.csv_text(rows))
        out.print(f"csv: {args.csv}")
    if args.html:
        from .html_report import render

        write_text_atomic(args.html, render(results))
        out.print(f"html: {args.html}")
    return 0


def cmd_demo(args) -> int:
    from .cli_grid import cmd_demo as run

    return run(args)


def cmd_leaderboard(args) -> int:
    from .cli_grid import cmd_leaderboard as run

    return run(args)


def cmd_plan(args) -> int:
    from .cli_plan import cmd_plan as run

    return run(args)


def cmd_plot(args) -> int:
    from . import plots
    from .io import write_json_atomic
    from .run_sets import load_runs

    plots.check_out_path(args.out)
    if args.kind == "matrix":
        picked = plots.pick_result(args.result, args.strategy, args.order, args.num_tasks)
        if picked.get("diverged"):
            d = picked.get("divergence") or {}
            raise UserError(f"that run diverged at step {d.get('step')} ({d.get('quantity')}); it has no full "
                            "accuracy matrix to plot")
        fig = plots.matrix_figure(picked)
    elif args.kind == "curves":
        results = load_runs(args.paths)
        diverged = [r for r in results if r.get("diverged")]
        if diverged:  # no curve for a run without metrics
            out.print(f"[yellow]{len(diverged)} diverged run(s) left out[/] (e.g. {diverged[0].get('run_id')})")
            results = [r for r in results if not r.get("diverged")]
        if args.strategies:
            results = [r for r in results if r["strategy"] in args.strategies]
        if not results:
            raise UserError(f"no result files{' of ' + ', '.join(args.strategies) if args.strategies else ''} "
                            f"under {', '.join(map(str, args.paths))}")
        fig = plots.curves_figure(results)
    else:
        if args.kind == "disentanglement":
            if not 2 <= args.grid <= 101:
                raise UserError(f"--grid must be between 2 and 101; got {args.grid}")
            if args.eval_n < 1:
                raise UserError(f"--eval-n must be at least 1; got {args.eval_n}")
            others_alpha = plots.parse_alpha(args.others_alpha)
        source = plots.ExpertSource(args.benchmark, args.learners, order=args.order, seed=args.seed,
                                    overrides=args.overrides, progress=not args.quiet)
        if args.kind == "delta-hist":
            indices = [source.task_index(t) for t in (args.tasks or [str(i) for i in range(1, min(3, len(source.stream)) + 1)])]
            data = plots.delta_hist_data(source, args.learners, indices)
            fig = plots.delta_hist_figure(data)
        else:
            pair = tuple(source.task_index(t) for t in args.pair)
            if pair[0] == pair[1]:
                raise UserError(f"--pair needs two different tasks; got {args.pair[0]} twice")
            data = {"panels": [plots.disentanglement_data(source, name, pair, args.others, others_alpha,
                                                          grid=args.grid, eval_n=args.eval_n)
                               for name in args.learners]}
            fig = plots.disentanglement_figure(data["panels"])
        if args.data:
            write_json_atomic(args.data, data)
            out.print(f"data: {args.data}")
    plots.save_figure(fig, args.out)
    out.print(f"plot: {args.out} — {plots.title_of(fig)}", highlight=False)
    return 0


COMMANDS = {"run": cmd_run, "list": cmd_list, "report": cmd_report, "demo": cmd_demo,
            "leaderboard": cmd_leaderboard, "plan": cmd_plan, "plot": cmd_plot}


def main(argv: Optional[List[str]] = None) -> int:
    from .divergence import EXIT_CODE, Diverged
    from .io import os_error_line

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        err.print(f"cl-merge: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except Diverged as exc:
        err.print(f"cl-merge: {exc}; no results file written, finished steps stay checkpointed (lower "
                  "learner.lr, or run.on_divergence=record to record the run as diverged)", markup=False, highlight=False,
                  soft_wrap=True)
        return EXIT_CODE
    except OSError as exc:  # I/O failures are the user's to fix (permissions, space, a file in the way)
        err.print(f"cl-merge: error: {os_error_line(exc)}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except GridFailed as exc:
        err.print(f"cl-merge: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("cl-merge: interrupted; rerun with --resume to continue from the last finished step")
        return 130
    except Exception:
        traceback.print_exc()
        err.print("cl-merge: internal error (the traceback above); please report it", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
