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
    names = [m for m in MERGERS.names() if m != "identity"]
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
