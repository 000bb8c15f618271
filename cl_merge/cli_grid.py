"""The grid commands of ``cl-merge``: ``demo`` (every strategy on the mini suite) and ``leaderboard``
(a grid file run locally or on Ray, then the leaderboard from the result files alone). Both run
through ``cl_merge.grid``; ``cl_merge.cli`` parses the arguments and reports errors."""

from __future__ import annotations

import os

from .cli import err, out, show_run
from .errors import GridFailed, UserError


def cmd_demo(args) -> int:
    from . import report
    from .demo import demo_configs, run_demo
    from .io import write_text_atomic

    configs = demo_configs(args.strategies, args.order, args.seed, getattr(args, "overrides", None))
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1 or len(configs) == 1:
        results = run_demo(configs, args.out, jobs, progress=not args.quiet,
                           on_start=lambda config: out.rule(config.label), on_result=show_run).results
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn(f"mini suite, {len(configs)} strategies in {jobs} processes"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=out, disable=args.quiet) as bar:
            job = bar.add_task("demo", total=len(configs))

            def finished(result, path):
                show_run(result, path)
                bar.advance(job)

            results = run_demo(configs, args.out, jobs, on_result=finished).results
    rows = report.rows(results)
    out.print(report.rich_table(rows, title="mini suite (ACC/BWT/FWT in %)"))
    write_text_atomic(args.out / "leaderboard.md", report.markdown(rows))
    write_text_atomic(args.out / "leaderboard.csv", report.csv_text(rows))
    out.print(f"wrote {len(results)} result files, leaderboard.md and leaderboard.csv to {args.out}")
    return 0


def cmd_leaderboard(args) -> int:
    from . import leaderboard as lb
    from .grid.formatting import shared_settings_note
    from .io import write_text_atomic

    if args.address and args.engine != "ray":
        raise UserError("--address is for --engine ray; add --engine ray or drop --address")
    grid = lb.load_grid(args.config)
    configs = lb.expand(grid)  # every name and override is checked before anything runs
    reference, failed = None, {}
    if any(c.benchmark in lb.REFERENCE_BENCHMARKS for c in configs):
        if args.reference or lb.REFERENCE_TABLE.exists():
            reference = lb.load_reference(args.reference or lb.REFERENCE_TABLE)
        else:
            out.print(f"[yellow]the paper's reference table is not at {lb.REFERENCE_TABLE} (not a source "
                      "checkout?); pass --reference PATH to show it[/]")
    markdown_path = args.markdown or grid.markdown
    csv_path = args.csv or grid.csv
    for target in (markdown_path, csv_path):
        if target is not None and target.is_dir():
            raise UserError(f"{target} is a directory; give a file path for the leaderboard")
    if not args.report_only:
        from .results import ensure_results_dir

        ensure_results_dir(grid.out)
        if args.engine == "ray":
            from . import ray_engine

            outcome = ray_engine.run_grid(configs, grid.out, resources=grid.ray, address=args.address,
                                          progress=not args.quiet, console=out, where=f"grid {args.config}")
            counts, failed = outcome.counts, outcome.failed
            _ray_summary(outcome)
        else:
            counts = lb.run_grid(configs, grid.out, progress=not args.quiet, console=out).counts
        out.print(f"{len(configs)} runs: {counts['ran']} ran now, {counts['finished_before']} had finished earlier"
                  + (f", {counts['failed']} failed" if counts.get("failed") else "")
                  + f" (results in {grid.out})", highlight=False)
    results, missing = lb.collect(configs, grid.out)
    if not results and failed:
        raise GridFailed(f"all {len(failed)} runs that ran failed (errors above); nothing to report")
    if not results:
        raise UserError(f"no results for any of the {len(configs)} runs of {args.config} under {grid.out}; "
                        "run it without --report-only")
    if missing:
        out.print(f"[yellow]{len(missing)} of {len(configs)} runs have no results yet[/] (e.g. "
                  f"{missing[0].run_id()}); rerun without --report-only to complete the grid")
    rows = lb.aggregate(results, reference)
    text = None
    if grid.select:  # per strategy, the swept setting with the best validation accuracy; defaults beside it
        chosen, choices = lb.select_by_validation(results)
        defaults = lb.aggregate([r for r in results if r.get("run_id") in grid.default_run_ids], reference)
        rows = lb.aggregate(chosen, reference)
        lb.mark_tuned(rows, choices)
        base_title = grid.title or f"leaderboard: {grid.benchmark}"
        out.print(lb.rich_table(defaults, f"{base_title} — defaults"))
        text = (lb.markdown(rows, f"{base_title} — tuned on validation ({grid.select}, test split never read "
                                  "for the choice)", reference, shared=grid.overrides)
                + "\n" + lb.markdown(defaults, f"{base_title} — defaults", reference, shared=grid.overrides))
        grid_title = f"{base_title} — tuned on validation ({grid.select})"
    else:
        grid_title = grid.title
    out.print(lb.rich_table(rows, grid_title))
    for note in (lb.footnotes(rows) + (lb.reference_notes(rows, reference) if reference else [])
                 + [shared_settings_note(grid.overrides)]):
        out.print(f"  {note}", highlight=False, soft_wrap=not out.is_terminal)
    if markdown_path:
        write_text_atomic(markdown_path, text if text is not None
                          else lb.markdown(rows, grid.title, reference, shared=grid.overrides))
        out.print(f"markdown: {markdown_path}")
    if csv_path:
        write_text_atomic(csv_path, lb.csv_text(rows, shared=grid.overrides))
        out.print(f"csv: {csv_path}")
    if failed:
        err.print(f"cl-merge: {len(failed)} of {len(configs)} runs failed (each error above, once); fix them and "
                  "rerun the same command: finished runs are skipped", markup=False, highlight=False)
        return 1
    return 0


def _ray_summary(outcome) -> None:
    for run_id, error in outcome.failed.items():
        n = outcome.attempts.get(run_id, 0)
        err.print(f"cl-merge: run {run_id} failed after {n} attempt{'' if n == 1 else 's'}: {error}",
                  markup=False, highlight=False, soft_wrap=True)
    for run_id, step in outcome.resumed.items():
        out.print(f"{run_id}: resumed from its step-{step} checkpoint "
                  f"({outcome.attempts.get(run_id, 1)} attempts)", highlight=False)
    if outcome.experts_planned:
        saved = outcome.expert_uses - outcome.experts_planned
        out.print(f"shared experts: {outcome.experts_planned} distinct for {outcome.expert_uses} run steps "
                  f"({outcome.experts_trained} trained now, {outcome.experts_cached} already cached, "
                  f"{len(outcome.experts_failed)} failed; {saved} trainings saved by sharing)"
                  + (f"; {outcome.trained_in_runs} trained inside runs (not planned)" if outcome.trained_in_runs else ""),
                  highlight=False)
    if outcome.ran or outcome.failed:
        out.print(f"Ray engine wall time {outcome.wall_s:.1f} s", highlight=False)
