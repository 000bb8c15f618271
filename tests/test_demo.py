"""The demo's worker processes: grouping by shared experts, and the same results as one process."""

from pathlib import Path

from _settings import FAST

from cl_merge.config import resolve
from cl_merge.demo import plan_groups, run_parallel
from cl_merge.results import strip_volatile
from cl_merge.runner import execute


def test_strategies_sharing_independent_experts_run_in_one_group_in_listing_order():
    names = ["c-ft", "c-ta", "saim", "swa", "ewc", "magmax"]
    configs = [resolve("mini", strategy=n) for n in names]
    groups = [[names[i] for i in g] for g in plan_groups(configs, Path("out"))]
    assert sorted(map(sorted, groups)) == sorted([["c-ft"], ["c-ta", "magmax", "swa"], ["saim"], ["ewc"]])
    assert ["c-ta", "swa", "magmax"] in groups  # the first of the group trains, the others read the cache
    assert groups[0] == ["ewc"]  # the costliest group (by learner cost) starts first
    # a changed learner hyperparameter means other experts: its own group
    other = resolve("mini", strategy="swa", overrides=["learner.lr=1e-4"])
    assert len(plan_groups([configs[1], other], Path("out"))) == 2


def test_worker_processes_give_the_results_of_one_process(tmp_path):
    configs = [resolve("mini", strategy=n, overrides=FAST + ["run.threads=1"]) for n in ("c-ta", "swa", "c-ft")]
    seen = []
    parallel = run_parallel(configs, tmp_path / "parallel", jobs=2, on_result=lambda r, p: seen.append(p))
    assert sorted(p.name for p in seen) == sorted(p.name for p in (tmp_path / "parallel").glob("*.json"))
    assert [r["strategy"] for r in parallel] == ["c-ta", "swa", "c-ft"]
    assert parallel[1]["expert_source"] == ["cache"] * 3  # swa reused c-ta's experts
    single = [execute(c, out_dir=tmp_path / "single", progress=False)[0] for c in configs]
    assert [strip_volatile(r) for r in parallel] == [strip_volatile(r) for r in single]


def test_one_process_demo_runs_every_config_afresh_in_order(tmp_path):
    from cl_merge.demo import run_demo

    configs = [resolve("mini", strategy=n, overrides=FAST + ["run.threads=1"]) for n in ("c-ta", "swa")]
    started, finished = [], []
    outcome = run_demo(configs, tmp_path, jobs=1, progress=False, on_start=lambda c: started.append(c.label),
                       on_result=lambda r, p: finished.append(p.name))
    assert started == ["c-ta", "swa"] and outcome.ran == 2 and not outcome.failed
    assert [r["strategy"] for r in outcome.results] == ["c-ta", "swa"]
    assert sorted(finished) == sorted(p.name for p in tmp_path.glob("*.json"))
    again = run_demo(configs, tmp_path, jobs=1, progress=False)  # a demo never skips: both run again
    assert again.ran == 2 and again.finished_before == 0
    assert [strip_volatile(r) for r in again.results] == [strip_volatile(r) for r in outcome.results]
