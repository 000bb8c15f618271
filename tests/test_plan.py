"""``cl-merge plan``: its counts equal what real runs do (an instrumented mini grid run, and the committed
mini results that `make results` produced), it plans every committed grid, and its prices follow
their formula."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cl_merge import divergence, protocol
from cl_merge.calibration import PhaseCosts, load_calibration, price
from cl_merge.cli import main
from cl_merge.cli_plan import build_plan, render
from cl_merge.grid.cost import RunCost
from cl_merge.models.base import ModelAdapter
from cl_merge.sar import MergedBasis, SARMeter

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_GRIDS = sorted([*ROOT.glob("results/*.toml"), *ROOT.glob("benchmarks/*/configs/*.toml"),
                          *ROOT.glob("benchmarks/*/*.toml")])
EXAMPLE_CALIBRATION = ROOT / "benchmarks" / "perf" / "calibration_cpu.json"

SMALL_GRID = """
benchmark = "mini"
num_tasks = [2, 3]
orders = [1]
seeds = [0]
overrides = ["learner.steps=3", "benchmark.n_train=48", "benchmark.n_val=16", "benchmark.n_test=24",
             "run.threads=1"]
out = "runs"

[[runs]]
strategy = "c-ft"

[[runs]]
strategy = "c-ta"
sweep = {"merger.alpha" = [0.3, 0.6]}

[[runs]]
strategy = "ewc"

[[runs]]
strategy = "saim"
overrides = ["merger.alpha_grid=0.9,1.0"]

[[runs]]
strategy = "c-ties"
overrides = ["run.sar_store=false", "run.eval_unseen=false"]

[[runs]]
strategy = "fisher"
protocol = "multitask"

[[runs]]
strategy = "c-epimer"
"""


@contextlib.contextmanager
def counting(monkeypatch):
    """Counts what the runs of this process do, at the functions the protocol loop calls."""
    n = collections.Counter()
    real_check = divergence.check_iteration

    def check(ctx, loss):
        n["fine_tune_steps"] += 1
        return real_check(ctx, loss)

    for module in list(sys.modules.values()):  # every module that imported it by name
        if getattr(module, "check_iteration", None) is real_check:
            monkeypatch.setattr(module, "check_iteration", check)

    real_eval = ModelAdapter.evaluate

    def evaluate(self, task, split="test"):
        n[f"{split}_evals"] += 1
        n[f"{split}_samples"] += len(getattr(task, split))
        return real_eval(self, task, split)

    monkeypatch.setattr(ModelAdapter, "evaluate", evaluate)

    def wrap(owner, name, key, count=lambda result, *a, **k: 1):
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            n[key] += count(result, *args, **kwargs)
            return result

        monkeypatch.setattr(owner, name, wrapped)

    wrap(protocol, "merge_step", "merges")
    wrap(protocol, "merge_at_once", "merges")
    wrap(SARMeter, "step", "sar_steps")
    wrap(SARMeter, "step", "sar_scores", lambda out, *a, **k: len(out["per_task"]) if out["per_task"] else 1)
    wrap(MergedBasis, "from_states", "sar_steps")
    wrap(MergedBasis, "score", "sar_scores")
    wrap(protocol, "expert_fisher", "fishers", lambda out, *a, **k: out[3] == "computed")
    yield n


def test_plan_counts_equal_an_instrumented_grid_run(tmp_path, monkeypatch):
    from cl_merge import leaderboard as lb

    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(SMALL_GRID)
    plan = build_plan([grid_file], None, measure=False, save_calibration=None)
    configs = lb.expand(lb.load_grid(grid_file))
    assert plan["total"]["runs"] == len(configs) == 16
    with counting(monkeypatch) as n:
        lb.run_grid(configs, tmp_path / "runs", progress=False)
    total = plan["total"]
    for key in ("fine_tune_steps", "merges", "sar_steps", "sar_scores", "fishers"):
        assert total[key] == n[key], key
    assert total["test_evals"] == n["test_evals"] and total["test_samples"] == n["test_samples"]
    assert total["val_evals"] == n["val_evals"] and total["val_samples"] == n["val_samples"]
    assert total["merge_validation_evals"] == 2 * (2 + 3)  # saim: 2 α candidates per step, T = 2 and 3

    results = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text())
               for p in (tmp_path / "runs").glob("*.json")}
    sources = collections.Counter(s for r in results.values() for s in r["expert_source"])
    assert total["experts_trained"] == sources["trained"] == plan["distinct_experts"]
    assert total["experts_from_cache"] == sources["cache"]
    for run in plan["runs"]:  # and run by run
        r = results[run["run_id"]]
        assert run["experts_trained"] == r["expert_source"].count("trained"), run["run_id"]
        assert run["merges"] == len(r["merge_record"])


def _committed_counts(r):
    """What a committed result file says its run did (test / validation evaluations, merges, SAR scores)."""
    test = sum(v is not None for row in r["acc_matrix"] for v in row) + len(r["expert_acc"])
    val = sum(v is not None for v in r["val_acc"])
    scores = sum(len(p) if p else (s is not None) for p, s in zip(r["sar_per_task"], r["sar"]))
    return test, val, len(r["merge_record"]), scores


@pytest.mark.parametrize("grid", ["leaderboard_mini.toml", "leaderboard_mini_tuned.toml",
                                  "leaderboard_mini_multitask.toml"])
def test_plan_counts_equal_the_committed_mini_results(grid):
    """The committed mini grids against the result files `make results` wrote (no run here)."""
    plan = build_plan([ROOT / "results" / grid], None, measure=False, save_calibration=None)
    out = ROOT / "results" / Path(grid).stem.replace("leaderboard_", "").replace("_tuned", "") / "runs"
    assert plan["finished_runs"] == plan["total"]["runs"]
    for run in plan["runs"]:
        r = json.loads((out / f"{run['run_id']}.json").read_text())
        assert len(r["tasks"]) == run["T"]
        assert _committed_counts(r) == (run["test_evals"], run["val_evals"], run["merges"], run["sar_scores"])
        # experts obtained per step (trained or read from the cache); a sequential run trains its own
        assert len(r["expert_source"]) == run["T"]
        if run["protocol"] == "sequential":
            assert r["expert_source"].count("trained") == run["experts_trained"] == run["T"]


@pytest.mark.parametrize("grid", COMMITTED_GRIDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_plan_runs_on_every_committed_grid(grid):
    from cl_merge import leaderboard as lb

    priced = build_plan([grid], EXAMPLE_CALIBRATION, measure=False, save_calibration=None)
    assert priced["total"]["runs"] == len(lb.expand(lb.load_grid(grid))) > 0
    assert all(r["merges"] >= 1 and r["test_evals"] >= r["T"] for r in priced["runs"])
    calibration = load_calibration(EXAMPLE_CALIBRATION)
    for key, g in priced["by_model"].items():  # priced wherever the file has the model, "n/a" elsewhere
        assert (g["total_seconds"] is not None and g["total_seconds"] > 0) == (key in calibration.models), key
    text = io.StringIO()
    render(priced, Console(file=text, width=160))
    assert "device-hours by phase" in text.getvalue()


def test_plan_cli_writes_json_and_rejects_bad_input(tmp_path, capsys):
    target = tmp_path / "plan.json"
    assert main(["plan", str(ROOT / "results" / "leaderboard_mini_multitask.toml"), "--counts-only",
                 "--json", str(target)]) == 0
    data = json.loads(target.read_text())
    assert data["total"]["runs"] == 40 and data["distinct_experts"] == 9  # 8 strategies × 5 orders share 9 experts
    assert main(["plan", str(tmp_path / "missing.toml")]) == 2
    assert "no such grid file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["plan", str(ROOT / "results" / "leaderboard_mini_multitask.toml"), "--calibration", str(bad)]) == 2


def test_price_follows_its_formula():
    costs = PhaseCosts(fit={"adam": {"step_s": 0.5, "batch": 8.0, "fixed_s": 2.0, "fixed_per_train_sample_s": 0.01}},
                       eval_sample_s=1e-3, merge_s={"ties": 3.0}, sar_step_s=0.2, sar_score_s=0.05,
                       fisher_sample_s=0.1, setup_s=4.0)
    from cl_merge.config import resolve

    run = RunCost(config=resolve("mini", strategy="c-ties"), T=3, calibration_key="mini", trains=True, shared=True,
                  steps_per_fit=10, batch_size=16, train_size=100.0, fits_trained=2, merges=3, test_samples=1000,
                  val_samples=200, sar_steps=3, sar_scores=6)
    seconds = price(run, costs)
    assert math.isclose(seconds["fit"], 2 * (2.0 + 0.01 * 100 + 0.5 * 16 / 8 * 10))
    assert math.isclose(seconds["eval"], 1200 * 1e-3)
    assert math.isclose(seconds["merge"], 9.0) and math.isclose(seconds["sar"], 3 * 0.2 + 6 * 0.05)
    assert seconds["setup"] == 4.0 and seconds["fisher"] == 0.0
    assert price(run, None)["fit"] is None
