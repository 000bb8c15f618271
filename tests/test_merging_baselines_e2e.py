"""C-TIES (both variants), MagMax-IND and OPCM end to end on the mini suite (fast settings). All runs
share one output folder, so the independent experts are trained once and reused by every merger."""

import json

import pytest
from _settings import Killed, kill_merges_at

from cl_merge.config import resolve
from cl_merge.registry import LEARNERS, MERGERS
from cl_merge.results import STABLE_KEYS, strip_volatile
from cl_merge.runner import execute

T = 3


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines")


def run(out, overrides, name="runs", resume=False, **kw):
    # one expert/head cache for every run of the module, whatever its output folder
    cfg = resolve("mini", overrides=overrides + [f"run.cache_dir={out / 'cache'}"], **kw)
    return execute(cfg, out_dir=out / name, resume=resume, progress=False)


def check_result(result, path):
    assert path.exists() and json.loads(path.read_text())["acc"] == result["acc"]
    assert set(STABLE_KEYS) <= set(result)
    assert len(result["acc_matrix"]) == T + 1
    assert all(len(row) == T and all(0.0 <= v <= 1.0 for v in row) for row in result["acc_matrix"])
    assert result["acc"] == pytest.approx(sum(result["acc_matrix"][T]) / T)


@pytest.mark.parametrize("strategy, merger, params", [
    ("c-ties", "ties", {"variant": "seed", "alpha": 0.3, "k": 0.2}),
    ("c-ties-fb", "ties", {"variant": "fusionbench", "alpha": 0.5, "k": 0.2}),
    ("magmax", "magmax", {"alpha": 0.5}),
    ("opcm", "opcm", {"alpha": 0.5}),
])
def test_baseline_strategies_run_with_paper_defaults(out_dir, fast_overrides, strategy, merger, params):
    result, path = run(out_dir, fast_overrides, strategy=strategy)
    check_result(result, path)
    assert result["merger"] == merger and result["protocol"] == "independent"
    recorded = json.dumps(result["hyperparameters"])
    for value in params.values():
        assert json.dumps(value) in recorded
    if strategy == "opcm":  # t = 1 deploys the expert itself
        assert result["acc_matrix"][1][0] == pytest.approx(result["expert_acc"][0])


def test_opcm_works_under_the_sequential_protocol(out_dir, fast_overrides):
    """Sequential: τ_t = expert − deployed_{t−1}, not expert − θ0 (covered for every merger in the unit
    tests; here once end to end, with the merger whose state depends most on it)."""
    result, path = run(out_dir, fast_overrides, learner="adam", merger="opcm", protocol="sequential")
    check_result(result, path)
    assert result["protocol"] == "sequential"


def test_sa_bcd_with_ties_runs(out_dir, fast_overrides):
    """The paper's Table 10 row (SA-BCD fine-tuning + C-TIES): any learner combines with any merger."""
    if "sa_bcd" not in LEARNERS:
        pytest.skip("the SA-BCD learner is not registered in this checkout")
    result, path = run(out_dir, fast_overrides, learner="sa_bcd", merger="ties")
    check_result(result, path)
    assert result["learner"] == "sa_bcd"


@pytest.mark.parametrize("strategy", ["opcm"])
def test_resume_after_a_kill_gives_the_uninterrupted_result(out_dir, fast_overrides, monkeypatch, strategy):
    full, _ = run(out_dir, fast_overrides, strategy=strategy)
    merger_cls = MERGERS.get(resolve("mini", strategy=strategy).merger)
    restore = kill_merges_at(monkeypatch, merger_cls, at_step=3)
    with pytest.raises(Killed):
        run(out_dir, fast_overrides, name=f"killed-{strategy}", strategy=strategy)
    restore()
    resumed, _ = run(out_dir, fast_overrides, name=f"killed-{strategy}", resume=True, strategy=strategy)
    same = lambda r: {k: v for k, v in strip_volatile(r).items() if k != "expert_source"}  # noqa: E731
    assert same(resumed) == same(full)
