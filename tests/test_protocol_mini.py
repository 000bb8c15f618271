"""End-to-end runs of the protocol loop on the mini suite (small settings for speed)."""

import json

import pytest
from _settings import Killed, kill_merges_at

from cl_merge.config import resolve
from cl_merge.learner import GradientLearner
from cl_merge.registry import MERGERS
from cl_merge.results import STABLE_KEYS, strip_volatile
from cl_merge.runner import execute


def run(tmp_path, strategy, overrides, name="out", resume=False, **kw):
    cfg = resolve("mini", strategy=strategy, overrides=overrides, **kw)
    return execute(cfg, out_dir=tmp_path / name, resume=resume, progress=False)


@pytest.mark.parametrize("strategy", ["c-ft", "c-ta", "swa"])
def test_strategy_runs_end_to_end_and_writes_a_complete_result(tmp_path, fast_overrides, strategy):
    result, path = run(tmp_path, strategy, fast_overrides)
    assert path.exists() and json.loads(path.read_text())["acc"] == result["acc"]
    assert set(STABLE_KEYS) <= set(result)
    T = 3
    assert len(result["tasks"]) == T and len(result["acc_matrix"]) == T + 1
    assert all(len(row) == T and all(0.0 <= v <= 1.0 for v in row) for row in result["acc_matrix"])
    assert len(result["expert_acc"]) == T and len(result["sar"]) == T
    assert result["bwt_denominator"] == T - 1
    assert result["acc"] == pytest.approx(sum(result["acc_matrix"][T]) / T)
    last = result["acc_matrix"][T]
    assert result["bwt"] == pytest.approx(sum(last[i] - result["acc_matrix"][i + 1][i] for i in range(T - 1)) / (T - 1))
    assert not list(path.parent.glob("*.ckpt"))  # the resume point is removed once results exist


def test_row_zero_is_the_pretrained_model_and_c_ft_deploys_the_expert(tmp_path, fast_overrides):
    result, _ = run(tmp_path, "c-ft", fast_overrides)
    ta, _ = run(tmp_path, "c-ta", fast_overrides)
    assert result["acc_matrix"][0] == ta["acc_matrix"][0]  # same θ0, whatever the strategy
    for t in range(1, 4):  # identity merger: the deployed model is the expert
        assert result["acc_matrix"][t][t - 1] == pytest.approx(result["expert_acc"][t - 1])


def test_same_config_and_seed_give_identical_results(tmp_path, fast_overrides):
    a, _ = run(tmp_path, "c-ft", fast_overrides, name="a")
    b, _ = run(tmp_path, "c-ft", fast_overrides, name="b")
    assert strip_volatile(a) == strip_volatile(b)
    c, _ = run(tmp_path, "c-ft", fast_overrides, name="c", seed=1)
    assert c["acc_matrix"][1:] != a["acc_matrix"][1:]


# c-tsv-m: a state that grows with t (each task's factors, int64 tags) goes through the step checkpoint
@pytest.mark.parametrize("strategy", ["c-ft", "c-ta", "c-tsv-m"])
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, fast_overrides, monkeypatch, strategy):
    full, _ = run(tmp_path, strategy, fast_overrides, name="full")
    merger_cls = MERGERS.get(resolve("mini", strategy=strategy).merger)
    restore = kill_merges_at(monkeypatch, merger_cls, at_step=2)
    with pytest.raises(Killed):
        run(tmp_path, strategy, fast_overrides, name="killed")
    ckpts = list((tmp_path / "killed").glob("*.ckpt"))
    assert len(ckpts) == 1 and json.loads((ckpts[0] / "state.json").read_text())["step"] == 1
    assert not list((tmp_path / "killed").glob("*.json"))  # no half-written results
    restore()
    resumed, _ = run(tmp_path, strategy, fast_overrides, name="killed", resume=True)
    assert strip_volatile(resumed) == strip_volatile(full)


def test_independent_experts_are_trained_once_and_reused_by_other_mergers(tmp_path, fast_overrides, monkeypatch):
    calls = []
    original = GradientLearner.fit

    def counting_fit(self, start, ctx):
        calls.append(ctx.task.name)
        return original(self, start, ctx)

    monkeypatch.setattr(GradientLearner, "fit", counting_fit)
    ta, _ = run(tmp_path, "c-ta", fast_overrides)
    swa, _ = run(tmp_path, "swa", fast_overrides)
    other_order, _ = run(tmp_path, "c-ta", fast_overrides, order=2)
    assert len(calls) == 3 + 0 + len(set(other_order["tasks"]) - set(ta["tasks"]))
    assert ta["expert_source"] == ["trained"] * 3 and swa["expert_source"] == ["cache"] * 3
    assert ta["expert_acc"] == swa["expert_acc"]
    # sequential experts depend on the start point: never cached
    ft, _ = run(tmp_path, "c-ft", fast_overrides)
    assert ft["expert_source"] == ["trained"] * 3


def test_seen_only_evaluation_leaves_unseen_cells_null(tmp_path, fast_overrides):
    result, _ = run(tmp_path, "c-ft", fast_overrides + ["run.eval_unseen=false"])
    m = result["acc_matrix"]
    assert all(v is not None for v in m[0])  # θ0 row is always complete
    assert m[1][1] is None and m[1][2] is None and m[2][2] is None and m[2][1] is not None
    assert result["fwt"] is None and result["bwt"] is not None


@pytest.mark.slow
def test_mini_suite_shows_the_phenomena_the_harness_measures(tmp_path):
    """Defaults of the mini suite: zero-shot above chance on every task, experts well above
    zero-shot, and clear forgetting under continual fine-tuning."""
    result, _ = run(tmp_path, "c-ft", [])
    zero_shot = result["acc_matrix"][0]
    chance = [1.0 / len(spec) for spec in _classes(result["tasks"])]
    assert all(z > 1.2 * c for z, c in zip(zero_shot, chance)), (zero_shot, chance)
    gains = [e - z for e, z in zip(result["expert_acc"], zero_shot)]
    assert sum(gains) / len(gains) > 0.15, gains
    assert result["bwt"] < -0.05, result["bwt"]


def _classes(names):
    from cl_merge.benchmarks.mini.data import TASKS

    by_name = {t.name: t.classnames for t in TASKS}
    return [by_name[n] for n in names]


def test_runs_record_the_final_row_on_the_validation_splits(tmp_path, fast_overrides, monkeypatch):
    from cl_merge.models.clip import ClipClassifier

    calls = []
    real = ClipClassifier.score

    def score(self, task, split="test"):
        value = real(self, task, split)
        calls.append((task.name, split, value))
        return value

    monkeypatch.setattr(ClipClassifier, "score", score)
    result, _ = run(tmp_path, "c-ta", fast_overrides)
    val_calls = [c for c in calls if c[1] == "val"]
    assert [c[0] for c in val_calls] == result["tasks"]  # once per task, after the last step
    assert result["val_acc"] == [c[2] for c in val_calls]
    assert all(0.0 <= v <= 1.0 for v in result["val_acc"])
