"""The researcher-facing surface: output saved to a file shows every value whole, plain timestamped
log lines off a terminal, the CLI's help/defaults/--version, the Python API (the README example),
the results file's provenance keys, and a task-arithmetic run that never imports Avalanche."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _settings import SMALL

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cl_merge"]
TINY = ["benchmark.num_tasks=2", "benchmark.n_train=64", "benchmark.n_val=32", "benchmark.n_test=48",
        "learner.steps=5"]


def cli(*args, cwd=None, env=None):
    """cl-merge in a subprocess, stdout and stderr piped (not a terminal), at COLUMNS=80."""
    full_env = dict(os.environ, COLUMNS="80", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                    **(env or {}))
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd or ROOT,
                          env=full_env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two c-ta runs differing only in lr, and a c-ft run, run through the CLI into a file."""
    out = tmp_path_factory.mktemp("surface") / "runs"
    logs = []
    for strategy, extra in (("c-ta", []), ("c-ta", ["learner.lr=0.001"]), ("c-ft", [])):
        proc = cli("run", "--benchmark", "mini", "--strategy", strategy, "--out", out, *SMALL, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs.append(proc)
    return out, logs


def no_cut(text):
    assert "…" not in text, text[:3000]


def test_a_run_piped_to_a_file_reads_whole(runs):
    out, logs = runs
    result = json.loads(next(out.glob("mini_c-ft_*.json")).read_text())
    text = logs[2].stdout
    no_cut(text)
    for name in result["tasks"]:  # every task name whole: a column header and a row label
        assert re.search(rf"\b\d: {re.escape(name)}\b", text), (name, text)
    # the summary is one line: no label wrapped away from its value
    summary = next(line for line in text.splitlines() if line.startswith("c-ft (sequential)"))
    assert f"ACC {100 * result['acc']:.1f}" in summary and f"BWT {100 * result['bwt']:.1f}" in summary
    assert "SAR " in summary and "norm. ACC " in summary
    # progress off a terminal: plain timestamped lines, never rich's source-file tags
    log = logs[2].stderr
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ step 1/3 ", log, re.M), log[-2000:]
    assert ".py:" not in log


def test_report_piped_tells_runs_apart_and_shows_every_value(runs, tmp_path):
    out, _ = runs
    proc = cli("report", out, "--markdown", tmp_path / "r.md", "--csv", tmp_path / "r.csv")
    assert proc.returncode == 0, proc.stderr
    no_cut(proc.stdout)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    for r in results:
        assert f"{100 * r['acc']:.1f}" in proc.stdout and f"{r['timings']['wall_s']:.1f}" in proc.stdout
    # the two c-ta runs differ only in learner.lr: the settings column names it
    assert "learner.lr=0.001" in proc.stdout and "learner.lr=0.0003" in proc.stdout
    md = (tmp_path / "r.md").read_text()
    assert "learner.lr=0.001" in md and "independent experts" in md


def test_list_piped_shows_every_hyperparameter_and_the_run_settings():
    proc = cli("list")
    assert proc.returncode == 0, proc.stderr
    no_cut(proc.stdout)
    from cl_merge.config import RunSettings, list_hyperparameters
    from cl_merge.registry import BENCHMARKS

    for name in BENCHMARKS.names():
        assert " ".join(list_hyperparameters(BENCHMARKS.get(name))) in proc.stdout, name
    for key in RunSettings.hyperparameters():
        assert f"run.{key}" in proc.stdout


def test_leaderboard_report_only_piped_reads_whole(tmp_path):
    proc = cli("leaderboard", ROOT / "results" / "leaderboard_mini.toml", "--report-only",
               "--markdown", tmp_path / "lb.md", "--csv", tmp_path / "lb.csv")
    assert proc.returncode == 0, proc.stderr
    no_cut(proc.stdout)
    csv_text = (tmp_path / "lb.csv").read_text()
    import csv as csvlib

    rows = list(csvlib.DictReader(csv_text.splitlines()))
    for row in rows:  # every mean ± std of the CSV appears whole in the piped table
        mean, std = float(row["acc_mean"]), row["acc_std"]
        cell = f"{100 * mean:.1f}" + (f" ± {100 * float(std):.1f}" if std else "")
        assert cell in proc.stdout, cell
        assert row["shared_overrides"] == "run.sar_store=true run.threads=1"
    assert "settings shared by every run: run.sar_store=true run.threads=1" in (tmp_path / "lb.md").read_text()


def test_rich_tables_fold_instead_of_cutting_on_a_narrow_terminal():
    from rich.console import Console

    from cl_merge import report

    result = {"strategy": "c-ta", "protocol": "independent", "tasks": ["a_very_long_task_name", "color_shape"],
              "acc_matrix": [[0.5, 0.5], [0.9, 0.5], [0.8, 0.9]], "expert_acc": [0.9, 0.95]}
    console = Console(width=30, force_terminal=True, record=True)
    console.print(report.matrix_table(result))
    text = console.export_text()
    assert "…" not in text
    assert "a_very_long_task_name" in re.sub(r"[\s│┃]+", "", text)  # folded onto lines, never cut


def test_help_version_and_defaults():
    proc = cli("--version")
    from cl_merge import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"cl-merge {__version__}"
    from cl_merge.cli import _parser

    parser = _parser()
    subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    stack = list(subparsers.choices.items())
    while stack:
        name, sub = stack.pop()
        for action in sub._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                stack += [(f"{name} {k}", v) for k, v in action.choices.items()]
            elif action.dest != "help":
                assert action.help, f"cl-merge {name} {action.option_strings or action.dest} has no help text"
    run_help = cli("run", "--help").stdout
    assert "(default: 0)" in run_help and "(default: results/runs)" in run_help


def test_module_entry_points_work_outside_the_repository(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    pre = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "cl_merge.benchmarks.mini.pretrain",
                          "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert pre.returncode == 0 and "--steps" in pre.stdout, pre.stderr[-2000:]
    fix = subprocess.run([sys.executable, "-m", "cl_merge.benchmarks.trace.fixtures", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert fix.returncode == 0 and "OUT_DIR" in fix.stdout
    assert list(tmp_path.iterdir()) == []  # help creates nothing (no folder named --help)


def test_demo_takes_overrides(tmp_path):
    proc = cli("demo", "--strategies", "c-ta", "swa", "--jobs", "1", "--out", tmp_path / "demo", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "demo").glob("*.json")]
    assert sorted(r["strategy"] for r in results) == ["c-ta", "swa"]
    assert all(len(r["tasks"]) == 2 and r["hyperparameters"]["learner.steps"] == 5 for r in results)
    bad = cli("demo", "--strategies", "c-ft", "--out", tmp_path / "bad", "merger.alpha=0.5")
    assert bad.returncode == 2 and "unknown key 'merger.alpha'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_task_arithmetic_run_never_imports_avalanche(tmp_path):
    code = ("import sys, cl_merge.cli as c; c.main(['run', '--benchmark', 'mini', '--strategy', 'c-ta', '--quiet', "
            f"'--out', {str(tmp_path / 'r')!r}, *{TINY!r}]); print('AVALANCHE' if 'avalanche' in sys.modules else 'NONE')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "NONE"


def test_results_record_provenance_and_both_normalizations(runs):
    out, _ = runs
    import hashlib

    from cl_merge.results import VOLATILE_KEYS

    ta = json.loads(next(p for p in out.glob("mini_c-ta_*.json")
                         if json.loads(p.read_text())["hyperparameters"]["learner.lr"] != 0.001).read_text())
    ft = json.loads(next(out.glob("mini_c-ft_*.json")).read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ta["created"]) and "created" in VOLATILE_KEYS
    assert "cl_merge" in ta["command_line"] and "--strategy c-ta" in ta["command_line"]
    assert ta["rerun_command"].startswith("cl-merge run --benchmark mini --strategy c-ta --protocol independent")
    assert re.fullmatch(r"[0-9a-f]{64}", ta["weight_sha256"]) and ta["weight_sha256"] != ft["weight_sha256"]
    # independent experts go through the cache: one key per task; sequential experts do not
    assert len(ta["expert_cache_keys"]) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", k) for k in ta["expert_cache_keys"])
    assert ft["expert_cache_keys"] == [None, None, None]
    # norm. ACC over the independent experts: the c-ft run found them in the cache the c-ta runs filled
    assert ft["independent_expert_acc"] == ta["expert_acc"]
    final = ft["acc_matrix"][-1]
    oracle = sum(a / e for a, e in zip(final, ta["expert_acc"])) / len(final)
    assert ft["normalized_acc_independent"] == pytest.approx(oracle)
    own = sum(a / e for a, e in zip(final, ft["expert_acc"])) / len(final)
    assert ft["normalized_acc"] == pytest.approx(own)
    assert ta["normalized_acc_independent"] == pytest.approx(ta["normalized_acc"])
    # timings: training and cache reads apart, summing to fit_s
    for r in (ta, ft):
        t = r["timings"]
        assert t["train_s"] + t["cache_read_s"] + t["expert_load_s"] == pytest.approx(t["fit_s"])
    assert ft["timings"]["cache_read_s"] == 0.0 and ft["timings"]["train_s"] > 0
    assert "rouge" in ta["environment"]["packages"] and "evalplus" in ta["environment"]["packages"]
    assert hashlib.sha256  # (the hash algorithm named by the key)


def test_conventions_index_the_arrays_as_stored():
    """Each conventions formula, read 0-based over the stored arrays, gives the recorded metric."""
    from cl_merge import metrics

    A = [[0.1, 0.2, 0.3], [0.7, 0.25, 0.35], [0.6, 0.8, 0.4], [0.5, 0.7, 0.9]]
    T = 3
    acc = sum(A[T][i] for i in range(T)) / T
    bwt = sum(A[T][i] - A[i + 1][i] for i in range(T - 1)) / (T - 1)
    fwt = sum(A[i][i] - A[0][i] for i in range(1, T)) / (T - 1)
    s = metrics.summary(A, [0.8, 0.9, 0.95], "sequential")
    assert (s["acc"], s["bwt"], s["fwt"]) == pytest.approx((acc, bwt, fwt))
    c = metrics.conventions("sequential")
    assert "A[T][i] - A[i+1][i]" in c["bwt"] and "i=0..T-2" in c["bwt"]
    assert "A[i][i] - A[0][i]" in c["fwt"] and "i=1..T-1" in c["fwt"]
    assert "0-based" in c["indexing"]


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's "Python API" block, run as written on a tiny mini suite."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    result, board = namespace["result"], namespace["board"]
    assert result.path.exists() and 0.0 <= result.acc <= 1.0
    assert [r.strategy for r in namespace["results"]] and board.rows
    assert {row.strategy for row in board.rows} == {"c-ft", "c-ta"}
    assert "| c-ta |" in board.markdown


def test_import_cl_merge_stays_light():
    code = "import sys, cl_merge; print(any(m in sys.modules for m in ('open_clip', 'avalanche', 'cl_merge.api')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "False", proc.stderr


def test_off_a_terminal_progress_is_timestamped_lines_with_an_eta(monkeypatch):
    import io

    from cl_merge import progress
    from cl_merge.console import LogConsole

    buffer = io.StringIO()
    monkeypatch.setattr(progress, "console", LogConsole(file=buffer))
    monkeypatch.setattr(progress, "LOG_PHASE_S", 0.0)  # every phase gets its line here
    with progress.overall("grid: 3 runs", total=3) as bar:
        bar.skip()  # a run finished earlier: counted, no line, not in the ETA
        with progress.Reporter() as reporter:
            with reporter.task("step 1/1 merge (swa)", total=None):
                pass
            reporter.log("step 1/1 shape: expert 0.900")
        bar.advance()
    lines = buffer.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
    assert re.fullmatch(stamp + r"step 1/1 merge \(swa\): \d+\.\d s", lines[0]), lines
    assert re.fullmatch(stamp + "step 1/1 shape: expert 0.900", lines[1]), lines
    assert re.fullmatch(stamp + r"grid: 3 runs: 2/3 done, \d+ s elapsed, ETA \d+ s", lines[2]), lines
    assert len(lines) == 3
