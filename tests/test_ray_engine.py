"""Leaderboard grids on Ray (``--engine ray``): same result files as the local runner, experts trained
once per key across merging strategies, a killed worker's run resumes from its checkpoint, a run's own
error is reported once. One local Ray instance (2 CPUs) serves the whole module."""

import json
import logging
import shutil

import pytest
import ray
import ray.cloudpickle
import torch

import _ray_faults

from cl_merge import leaderboard as lb
from cl_merge import ray_engine
from cl_merge.results import VOLATILE_KEYS
from cl_merge.cli import main
from cl_merge.results import ensure_results_dir
from cl_merge.runner import result_path

FAST = ["benchmark.num_tasks=3", "benchmark.n_train=96", "benchmark.n_val=32", "benchmark.n_test=96",
        "learner.steps=15", "run.threads=1"]
MERGING = ["c-ta", "swa", "magmax"]  # independent protocol, one learner (adam): they share experts
GRID = f"""
benchmark = "mini"
strategies = {json.dumps(MERGING + ["c-ft"])}
orders = [1, 3]  # at T=3 they share one task (shape), at different positions
overrides = {json.dumps(FAST)}
out = "runs"
markdown = "leaderboard.md"

[ray]
num_cpus = 1
max_retries = 2
"""
# the result keys that may differ between two executions of the same config: wall-clock timings,
# the process's peak memory and environment, the checkout state (others edit it meanwhile), and where
# each expert came from (the local runner's first strategy trains them, Ray's expert tasks do)
VOLATILE = set(VOLATILE_KEYS)  # the documented set (docs/results-schema.md): created, command_line, timings, …


def comparable(path):
    result = json.loads(path.read_text())
    return {k: v for k, v in result.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def local_ray():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, logging_level=logging.WARNING)
    ray.cloudpickle.register_pickle_by_value(_ray_faults)  # the workers cannot import tests/
    yield
    ray.shutdown()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grids(local_ray, tmp_path_factory):
    """The same grid run by the local runner (CLI) and on Ray (the engine, for its counts)."""
    local_dir, ray_dir = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    for d in (local_dir, ray_dir):
        (d / "grid.toml").write_text(GRID)
    assert main(["leaderboard", str(local_dir / "grid.toml"), "--quiet"]) == 0
    grid = lb.load_grid(ray_dir / "grid.toml")
    configs = lb.expand(grid)
    outcome = ray_engine.run_grid(configs, grid.out, resources=grid.ray, progress=False)
    return {"local": local_dir, "ray": ray_dir, "configs": configs, "outcome": outcome, "grid": grid}


def test_ray_grid_writes_the_local_runners_result_files(grids, capsys):
    configs, outcome = grids["configs"], grids["outcome"]
    assert len(configs) == 8 and outcome.ran == 8 and not outcome.failed
    for config in configs:
        mine = result_path(config, grids["ray"] / "runs")
        theirs = result_path(config, grids["local"] / "runs")
        assert mine.name == theirs.name
        assert comparable(mine) == comparable(theirs), config.run_id()
    # the report and resume read the files alone: rerunning on Ray runs nothing and reports the same table
    assert main(["leaderboard", str(grids["ray"] / "grid.toml"), "--engine", "ray", "--quiet"]) == 0
    assert "0 ran now, 8 had finished earlier" in capsys.readouterr().out
    assert (grids["ray"] / "leaderboard.md").read_text() == (grids["local"] / "leaderboard.md").read_text()


def test_independent_experts_are_trained_once_per_key_across_strategies(grids):
    outcome, configs = grids["outcome"], grids["configs"]
    independent = [c for c in configs if c.protocol == "independent"]
    tasks = {name for c in independent for name in ray_engine.task_names_of(c)}
    assert len(independent) == len(MERGING) * 2 and len(tasks) == 5  # 3 + 3 tasks, one in both orders
    # one training per (task, learner config, seed): 5, where every run training its own would be 18
    assert outcome.experts_planned == len(tasks) and outcome.expert_uses == 3 * len(independent)
    assert outcome.experts_trained == len(tasks) and outcome.experts_cached == 0
    assert outcome.trained_in_runs == 0
    cache = sorted((grids["ray"] / "runs" / ".cache" / "experts").glob("*.safetensors"))
    assert len(cache) == len(tasks)
    for config in independent:  # every run read all its experts from the cache
        assert json.loads(result_path(config, grids["ray"] / "runs").read_text())["expert_source"] == ["cache"] * 3


def test_a_killed_worker_is_retried_from_its_checkpoint_with_the_same_results(grids, tmp_path):
    config = next(c for c in grids["configs"] if c.strategy == "c-ft" and c.order == 1)
    marker = tmp_path / "killed"
    out = tmp_path / "runs"
    outcome = ray_engine.run_grid([config], out, resources=grids["grid"].ray, progress=False,
                                  around_run=_ray_faults.DieAfterStep(config.run_id(), 2, str(marker)))
    assert marker.read_text() == "killed after step 2\n"  # the first attempt died after step 2's checkpoint
    assert outcome.ran == 1 and not outcome.failed
    assert outcome.attempts[config.run_id()] == 2 and outcome.resumed[config.run_id()] == 2
    assert comparable(result_path(config, out)) == comparable(result_path(config, grids["local"] / "runs"))
    assert not (out / f"{config.run_id()}.ckpt").exists()  # the spent checkpoint is removed


def test_a_runs_own_error_is_reported_once_and_the_grid_reports_whats_missing(grids, tmp_path, capsys):
    good = next(c for c in grids["configs"] if c.strategy == "c-ft" and c.order == 1)
    ensure_results_dir(tmp_path / "runs")
    shutil.copy(result_path(good, grids["local"] / "runs"), tmp_path / "runs")  # finished earlier
    (tmp_path / "grid.toml").write_text(f"""
benchmark = "mini"
strategies = ["c-ft"]
orders = [1]
overrides = {json.dumps(FAST)}
out = "runs"
[[runs]]
strategy = "c-ft"
overrides = ["learner.lr=1e6"]
""")
    assert main(["leaderboard", str(tmp_path / "grid.toml"), "--engine", "ray", "--quiet"]) == 1
    captured = capsys.readouterr()
    failures = [line for line in captured.err.splitlines() if "failed after" in line]
    # a bad value is refused before anything runs; what fails inside a run here is its divergence
    assert len(failures) == 1 and "failed after 1 attempt: Diverged: diverged at step 1" in failures[0], failures
    assert "1 ran now" not in captured.out and "0 ran now, 1 had finished earlier, 1 failed" in captured.out
    assert "1 of 2 runs have no results yet" in captured.out and "c-ft" in captured.out
    assert "1 of 2 runs failed" in captured.err


@pytest.mark.parametrize("extra, needle", [
    ("[ray]\nnum_gpus = 1.5", "num_gpus must be a fraction in [0, 1] or a whole number"),
    ("[ray]\nmax_retries = -1", "max_retries must be an integer >= 0"),
    ("[ray]\ngpus = 1", "[ray] has unknown key 'gpus'"),
    ("[ray]\nnum_gpus = 0.5", "but the runs use run.device=cpu"),
])
def test_bad_ray_settings_are_one_line_user_errors(tmp_path, capsys, extra, needle):
    path = tmp_path / "grid.toml"
    path.write_text(f"benchmark = 'mini'\nstrategies = ['c-ta']\n{extra}\n")
    assert main(["leaderboard", str(path), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(path) in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*.json"))


def test_address_without_the_ray_engine_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "grid.toml"
    path.write_text("benchmark = 'mini'\nstrategies = ['c-ta']\n")
    assert main(["leaderboard", str(path), "--address", "auto"]) == 2
    assert "--address is for --engine ray" in capsys.readouterr().err


def test_benchmarks_that_cannot_name_their_tasks_are_planned_from_streams_built_on_ray(grids, tmp_path, monkeypatch):
    """A benchmark without task_names() (the base default): one Ray task builds each stream to name the
    tasks; the experts already in the grid's cache are then found there, not trained again."""
    from cl_merge.benchmarks.mini.benchmark import MiniBenchmark

    monkeypatch.setattr(MiniBenchmark, "task_names", lambda self, order: None)  # the driver's copy only
    cache = grids["ray"] / "runs" / ".cache"
    configs = [lb.expand(lb.parse_grid({"benchmark": "mini", "strategies": ["c-ta", "swa"], "orders": [1],
                                        "overrides": FAST + [f"run.cache_dir={cache}"]}))][0]
    outcome = ray_engine.run_grid(configs, tmp_path / "runs", progress=False)
    assert outcome.ran == 2 and not outcome.failed
    assert outcome.experts_planned == 3 and outcome.expert_uses == 6
    assert outcome.experts_cached == 3 and outcome.experts_trained == 0 and outcome.trained_in_runs == 0
    for config in configs:
        assert comparable(result_path(config, tmp_path / "runs"))["acc_matrix"] == \
            comparable(result_path(config, grids["local"] / "runs"))["acc_matrix"]
