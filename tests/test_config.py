import pytest

from cl_merge.config import parse_overrides, resolve
from cl_merge.errors import UserError


def test_strategy_defaults_and_benchmark_budget_are_layered():
    cfg = resolve("mini", strategy="c-ta")
    assert (cfg.learner, cfg.merger, cfg.protocol) == ("adam", "task_arithmetic", "independent")
    assert cfg.merger_params["alpha"] == 0.3
    assert cfg.learner_params["steps"] is not None and cfg.learner_params["lr"] is not None


def test_overrides_are_typed_and_qualified():
    cfg = resolve("mini", strategy="c-ta", overrides=["merger.alpha=0.5", "steps=7", "run.eval_unseen=false"])
    assert cfg.merger_params["alpha"] == 0.5
    assert cfg.learner_params["steps"] == 7
    assert cfg.run_params["eval_unseen"] is False


def test_any_learner_with_any_merger_by_name():
    cfg = resolve("mini", learner="adam", merger="swa", protocol="sequential")
    assert (cfg.learner, cfg.merger, cfg.protocol, cfg.label) == ("adam", "swa", "sequential", "adam+swa")


def test_fingerprint_ignores_speed_settings_but_not_hyperparameters():
    a = resolve("mini", strategy="c-ta")
    assert a.fingerprint() == resolve("mini", strategy="c-ta", overrides=["run.eval_batch_size=7"]).fingerprint()
    assert a.fingerprint() != resolve("mini", strategy="c-ta", overrides=["merger.alpha=0.4"]).fingerprint()
    assert a.fingerprint() != resolve("mini", strategy="c-ta", seed=1).fingerprint()


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="nope"), "unknown strategy 'nope'"),
    (dict(learner="nope", merger="swa"), "unknown learner 'nope'"),
    (dict(learner="adam", merger="nope"), "unknown merger 'nope'"),
    (dict(strategy="c-ta", overrides=["merger.beta=1"]), "unknown key 'merger.beta'"),
    (dict(strategy="c-ta", overrides=["zzz=1"]), "unknown key 'zzz'"),
    (dict(strategy="c-ta", overrides=["merger.alpha=high"]), "must be a number"),
    (dict(strategy="c-ta", overrides=["learner.steps=1.5"]), "must be an integer"),
    (dict(strategy="c-ta", overrides=["run.eval_unseen=maybe"]), "must be true or false"),
    (dict(strategy="c-ta", overrides=["learner.schedule=linear"]), "must be one of cosine, constant"),
    (dict(strategy="c-ta", overrides=["alpha"]), "not of the form key=value"),
    (dict(strategy="c-ta", order=99), "unknown order '99'"),
    (dict(strategy="c-ta", learner="adam"), "either --strategy or --learner"),
    (dict(learner="adam"), "name a strategy"),
])
def test_bad_input_raises_one_clear_user_error(kwargs, message):
    with pytest.raises(UserError) as info:
        resolve("mini", **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_benchmark():
    with pytest.raises(UserError, match="unknown benchmark 'imagenet'"):
        resolve("imagenet", strategy="c-ta")


def test_parse_overrides_keeps_equals_in_values():
    assert parse_overrides(["run.cache_dir=/a=b"]) == {"run.cache_dir": "/a=b"}
