"""SAIM (SA-BCD + adaptive isotropic merge) and the SAM/ASAM learners end to end on the mini suite."""

import pytest

from cl_merge.config import resolve
from cl_merge.registry import MERGERS
from cl_merge.runner import execute

T = 3


def run(tmp_path, shared_cache, overrides, name, **kw):
    cfg = resolve("mini", overrides=overrides + [f"run.cache_dir={shared_cache}"], **kw)
    result, _ = execute(cfg, out_dir=tmp_path / name, progress=False)
    return result


def check_complete(result):
    assert len(result["acc_matrix"]) == T + 1 and len(result["expert_acc"]) == T
    assert all(0.0 <= v <= 1.0 for row in result["acc_matrix"] for v in row)
    assert result["acc"] == pytest.approx(sum(result["acc_matrix"][T]) / T)


@pytest.mark.parametrize("protocol", ["independent", "sequential"])
def test_saim_runs_under_both_protocols(tmp_path, shared_cache, fast_overrides, protocol):
    result = run(tmp_path, shared_cache, fast_overrides, protocol, strategy="saim", protocol=protocol)
    check_complete(result)
    assert (result["learner"], result["merger"], result["protocol"]) == ("sa_bcd", "isotropic", protocol)
    hp = result["hyperparameters"]
    assert hp["learner.rho"] == 0.05 and hp["learner.p"] == 0.3 and hp["merger.alpha"] == 1.0
    # t = 1: Σ̂ = Σ and α = 1, so the deployed model is the first expert itself
    assert result["acc_matrix"][1][0] == pytest.approx(result["expert_acc"][0])


def test_sa_bcd_combines_with_every_merger(tmp_path, shared_cache, fast_overrides):
    """The Table 10 ablation: SA-BCD experts under any merger, by name (experts trained once)."""
    names = [m for m in MERGERS.names() if m != "identity" and "independent" in MERGERS.get(m).protocols]
    assert {"isotropic", "task_arithmetic", "swa"} <= set(names)
    first = None
    for merger in names:
        result = run(tmp_path, shared_cache, fast_overrides, merger, learner="sa_bcd", merger=merger,
                     protocol="independent")
        check_complete(result)
        first = first or result
        assert result["expert_acc"] == first["expert_acc"]  # same cached SA-BCD experts


@pytest.mark.parametrize("learner", ["sam", "asam"])
def test_sharpness_aware_learners_run_with_a_merger(tmp_path, shared_cache, fast_overrides, learner):
    result = run(tmp_path, shared_cache, fast_overrides, learner, learner=learner, merger="isotropic",
                 protocol="independent")
    check_complete(result)
    assert result["learner"] == learner


def test_alpha_chosen_on_validation_data_in_the_protocol_loop(tmp_path, shared_cache, fast_overrides, monkeypatch):
    """merger.alpha_grid: the loop binds a scorer on the current task's validation split (never test)
    around each merge; a one-value grid deploys exactly what that fixed α deploys."""
    from cl_merge.models.clip import ClipClassifier

    splits = []
    original = ClipClassifier.score

    def spy(self, task, split="test"):
        splits.append(split)
        return original(self, task, split)

    monkeypatch.setattr(ClipClassifier, "score", spy)
    grid = run(tmp_path, shared_cache, fast_overrides + ["merger.alpha_grid=0.2,0.9"], "grid", strategy="saim")
    assert len(grid["chosen_alpha"]) == T and set(grid["chosen_alpha"]) <= {0.2, 0.9}
    # each grid value scored once per merge on validation data, plus the final row's val_acc (T)
    assert splits.count("val") == 2 * T + T
    single = run(tmp_path, shared_cache, fast_overrides + ["merger.alpha_grid=0.2"], "single", strategy="saim")
    fixed = run(tmp_path, shared_cache, fast_overrides + ["merger.alpha=0.2"], "fixed", strategy="saim")
    assert single["chosen_alpha"] == [0.2] * T and "chosen_alpha" not in fixed
    assert single["acc_matrix"] == fixed["acc_matrix"]
