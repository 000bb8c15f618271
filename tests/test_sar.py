"""SAR against an independent numpy oracle (float64, written from the definition in docs/metrics.md)."""

import json

import numpy as np
import pytest
from _settings import Killed, kill_merges_at
from _settings import SMALL
import torch

from cl_merge.errors import UserError
from cl_merge.streaming import TensorSource
from cl_merge.sar import MergedBasis, SARMeter, energy_rank, layer_sar

ENERGY = 0.95


# ---- the oracle -------------------------------------------------------------------------------
def oracle_rank(s, energy=ENERGY):
    retained = np.sqrt(np.cumsum(s ** 2) / np.sum(s ** 2))
    return int(np.argmax(retained >= energy)) + 1  # the crossing component is included


def oracle_projector(dm, energy=ENERGY):
    u, s, _ = np.linalg.svd(dm, full_matrices=False)
    k = oracle_rank(s, energy)
    return u[:, :k] @ u[:, :k].T


def oracle_layer(dt, dm, energy=ENERGY):
    return np.linalg.norm(oracle_projector(dm, energy) @ dt, "fro") / np.linalg.norm(dt, "fro")


def oracle_task(dt_state, dm_state, energy=ENERGY):
    """mean over the 2-D layers whose task update is non-zero"""
    vals = [oracle_layer(dt_state[k], dm_state[k], energy) for k in dm_state
            if dm_state[k].ndim == 2 and np.any(dt_state[k])]
    return float(np.mean(vals))


def oracle_step(task_deltas, dm_state, energy=ENERGY):
    """basis of the current merged update once, then the mean over tasks"""
    return float(np.mean([oracle_task(d, dm_state, energy) for d in task_deltas]))


def buggy_step(task_deltas, dm_state, energy=ENERGY):
    """What a script that reuses its basis variable inside the task loop computes: from the second task
    on, each task is projected on the previous task's own basis instead of the merged one."""
    per_task = []
    for i, d in enumerate(task_deltas):
        vals = []
        for k in dm_state:
            if dm_state[k].ndim != 2:
                continue
            basis_source = dm_state[k] if i == 0 else task_deltas[i - 1][k]
            vals.append(oracle_layer(d[k], basis_source, energy))
        per_task.append(np.mean(vals))
    return float(np.mean(per_task))


def to_np(state):
    return {k: v.double().numpy() for k, v in state.items()}


def spectrum_matrix(rng, rows, cols, decay):
    u, _ = np.linalg.qr(rng.standard_normal((rows, min(rows, cols))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, min(rows, cols))))
    s = decay ** np.arange(min(rows, cols))
    return u @ np.diag(s) @ v.T


# ---- rank -------------------------------------------------------------------------------------
def test_energy_rank_includes_the_crossing_component():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # retained: 0.868, 0.970, ...
    assert energy_rank(s, 0.95) == 2 == oracle_rank(s.numpy())
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 1.0) == 4
    assert energy_rank(torch.zeros(3)) == 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = np.sort(rng.gamma(0.5, size=12))[::-1]
        assert energy_rank(torch.from_numpy(s.copy())) == oracle_rank(s)


# ---- one layer, one state -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (20, 20), (1, 9)])
def test_layer_sar_matches_the_oracle_on_random_matrices(shape):
    rng = np.random.default_rng(sum(shape))
    for decay in (0.5, 0.8, 0.95):
        dm = spectrum_matrix(rng, *shape, decay)
        dt = rng.standard_normal(shape) * 1e-3
        basis = MergedBasis({"w": torch.from_numpy(dm).float()}).bases["w"]
        got = layer_sar(torch.from_numpy(dt).float(), basis)
        assert got == pytest.approx(oracle_layer(dt, dm), abs=2e-5)
        assert 0.0 <= got <= 1.0


def test_state_sar_averages_2d_layers_and_skips_untouched_ones():
    rng = np.random.default_rng(1)
    merged = {"a.weight": spectrum_matrix(rng, 16, 8, 0.7), "b.weight": spectrum_matrix(rng, 8, 16, 0.9),
              "c.weight": spectrum_matrix(rng, 10, 10, 0.8), "a.bias": rng.standard_normal(16),
              "conv1.weight": rng.standard_normal((4, 3, 2, 2))}
    task = {k: rng.standard_normal(v.shape) for k, v in merged.items()}
    task["c.weight"] = np.zeros((10, 10))  # a layer the learner did not change
    basis = MergedBasis({k: torch.from_numpy(v).float() for k, v in merged.items()})
    assert set(basis.bases) == {"a.weight", "b.weight", "c.weight"}  # 1-D and 4-D tensors are not matrices
    got = basis.score({k: torch.from_numpy(v).float() for k, v in task.items()})
    assert got.layers == 2 and got.skipped == 1
    assert got.value == pytest.approx(oracle_task(task, merged), abs=2e-5)


def test_a_zero_merged_update_has_no_subspace_and_is_skipped():
    basis = MergedBasis({"w": torch.zeros(4, 3), "v": torch.eye(3)})
    got = basis.score({"w": torch.ones(4, 3), "v": torch.eye(3)})
    assert basis.bases["w"] is None and got.skipped == 1 and got.value == pytest.approx(1.0)


# ---- the per-step meter -------------------------------------------------------------------------
def _stream(protocol, T=4, seed=0):
    """Synthetic run: tasks with low-rank updates in different column subspaces, merged by task
    arithmetic (independent) or running average of sequential experts (sequential)."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (24, 10), "w2": (10, 24), "bias": (24,)}
    theta0 = {k: torch.from_numpy(rng.standard_normal(s)).float() for k, s in shapes.items()}
    deployed = {k: v.clone() for k, v in theta0.items()}
    steps = []
    for t in range(1, T + 1):
        start = theta0 if protocol == "independent" else deployed
        tau = {}
        for k, s in shapes.items():
            if len(s) == 2:  # rank-2 update living mostly in a task-specific block of rows
                rows = np.zeros(s[0])
                block = slice((t - 1) * 2 % s[0], (t - 1) * 2 % s[0] + 3)
                rows[block] = 1.0
                left = rng.standard_normal((s[0], 2)) * (0.1 + rows[:, None])
                tau[k] = torch.from_numpy(left @ rng.standard_normal((2, s[1])) * 1e-2).float()
            else:
                tau[k] = torch.from_numpy(rng.standard_normal(s) * 1e-2).float()
        expert = {k: start[k] + tau[k] for k in shapes}
        if protocol == "independent":
            deployed = {k: theta0[k] + 0.3 * sum(s_["tau"][k] for s_ in steps) + 0.3 * tau[k] for k in shapes}
        else:
            deployed = {k: ((t - 1) * deployed[k] + expert[k]) / t for k in shapes}
        steps.append({"start": start, "expert": expert, "deployed": deployed, "tau": tau})
    return theta0, steps


@pytest.mark.parametrize("protocol", ["independent", "sequential"])
def test_meter_with_storage_matches_the_oracle_over_seen_tasks(tmp_path, protocol):
    theta0, steps = _stream(protocol)
    meter = SARMeter(ENERGY, tmp_path / "store")
    discriminated = False
    for t, s in enumerate(steps, start=1):
        got = meter.step(t, theta0, s["start"], s["expert"], s["deployed"])
        task_deltas = [to_np({k: x["expert"][k] - x["start"][k] for k in theta0}) for x in steps[:t]]
        dm = to_np({k: s["deployed"][k] - theta0[k] for k in theta0})
        want_per_task = [oracle_task(d, dm) for d in task_deltas]
        assert got["current"] == pytest.approx(want_per_task[-1], abs=2e-5)
        assert got["per_task"][-1] == got["current"]
        # earlier tasks come back from bf16 storage: a few 1e-3 at most on these ratios
        assert got["per_task"] == pytest.approx(want_per_task, abs=3e-3)
        assert got["sar"] == pytest.approx(oracle_step(task_deltas, dm), abs=3e-3)
        if t > 1 and abs(buggy_step(task_deltas, dm) - got["sar"]) > 0.05:
            discriminated = True
    assert discriminated, "the synthetic stream should separate the right basis from an overwritten one"
    # written tensor by tensor (the streaming writer records per-tensor content hashes, checked on read)
    stored = dict(TensorSource(tmp_path / "store" / "task-1.safetensors", verify=True))
    assert set(stored) == {"w1", "w2"} and all(v.dtype == torch.bfloat16 for v in stored.values())


def test_meter_without_storage_scores_the_current_task_only(tmp_path):
    theta0, steps = _stream("independent")
    meter = SARMeter(ENERGY)
    for t, s in enumerate(steps, start=1):
        got = meter.step(t, theta0, s["start"], s["expert"], s["deployed"])
        dm = to_np({k: s["deployed"][k] - theta0[k] for k in theta0})
        assert got["sar"] == got["current"] == pytest.approx(oracle_task(to_np(s["tau"]), dm), abs=2e-5)
        assert got["per_task"] is None
    assert meter.scope == "current_task" and SARMeter(store_dir=tmp_path).scope == "seen_tasks"


def test_a_resumed_meter_reads_earlier_tasks_from_the_store(tmp_path):
    theta0, steps = _stream("independent")
    full = SARMeter(ENERGY, tmp_path / "a")
    want = [full.step(t, theta0, s["start"], s["expert"], s["deployed"]) for t, s in enumerate(steps, 1)]
    first = SARMeter(ENERGY, tmp_path / "b")
    for t, s in enumerate(steps[:2], 1):
        first.step(t, theta0, s["start"], s["expert"], s["deployed"])
    resumed = SARMeter(ENERGY, tmp_path / "b")  # a new process after a kill
    got = [resumed.step(t, theta0, s["start"], s["expert"], s["deployed"]) for t, s in enumerate(steps, 1) if t > 2]
    assert [g["sar"] for g in got] == [w["sar"] for w in want[2:]]
    (tmp_path / "b" / "task-1.safetensors").unlink()
    with pytest.raises(UserError, match="lacks task 1"):
        resumed.step(4, theta0, steps[3]["start"], steps[3]["expert"], steps[3]["deployed"])


# ---- in the protocol ------------------------------------------------------------------------------
def test_runs_record_sar_per_step(tmp_path, shared_cache):
    from cl_merge.config import resolve
    from cl_merge.runner import execute

    common = SMALL + [f"run.cache_dir={shared_cache}"]
    ta, path = execute(resolve("mini", strategy="c-ta", overrides=common),  # default: the paper's scope
                       out_dir=tmp_path / "a", progress=False)
    T = len(ta["tasks"])
    assert ta["sar_scope"] == "seen_tasks" and ta["sar_energy"] == 0.95
    assert len(ta["sar"]) == T and all(0.0 <= v <= 1.0 for v in ta["sar"])
    assert [len(p) for p in ta["sar_per_task"]] == list(range(1, T + 1))
    assert ta["sar"][0] == ta["sar_current"][0]
    # step 1: the merged update is α·τ1, whose own top-k subspace keeps ≥ 95% of its energy
    assert ta["sar"][0] >= ENERGY
    assert ta["timings"]["sar_s"] >= 0.0 and "sar_s" in ta["timings"]["per_step"][0]
    assert not list(path.parent.glob("*.ckpt"))  # stored updates go away with the checkpoint
    assert json.loads(path.read_text())["sar"] == ta["sar"]

    # without storage: the current task only (SWA reuses C-TA's cached experts: no training here)
    swa, _ = execute(resolve("mini", strategy="swa", overrides=common + ["run.sar_store=false"]),
                     out_dir=tmp_path / "b", progress=False)
    assert swa["sar_scope"] == "current_task" and swa["sar_per_task"] == [None] * T
    assert swa["sar"] == swa["sar_current"] and swa["sar"][0] >= ENERGY  # step 1 deploys the expert itself
    assert swa["expert_source"] == ["cache"] * T


def test_a_killed_run_with_stored_updates_resumes_to_the_same_sar(tmp_path, shared_cache, monkeypatch):
    from cl_merge.config import resolve
    from cl_merge.registry import MERGERS
    from cl_merge.results import strip_volatile
    from cl_merge.runner import execute

    config = resolve("mini", strategy="c-ta", overrides=SMALL + [f"run.cache_dir={shared_cache}", "run.sar_store=true"])
    full, _ = execute(config, out_dir=tmp_path / "full", progress=False)
    merger_cls = MERGERS.get(config.merger)
    restore = kill_merges_at(monkeypatch, merger_cls, at_step=3)
    with pytest.raises(Killed):
        execute(config, out_dir=tmp_path / "killed", progress=False)
    ckpt = tmp_path / "killed" / f"{config.run_id()}.ckpt"
    assert sorted(p.name for p in (ckpt / "sar").iterdir()) == ["task-1.safetensors", "task-2.safetensors"]
    restore()
    resumed, _ = execute(config, out_dir=tmp_path / "killed", resume=True, progress=False)
    assert strip_volatile(resumed) == strip_volatile(full)
    assert not ckpt.exists()


def test_bad_sar_energy_is_a_user_error():
    from cl_merge.config import resolve

    with pytest.raises(UserError, match="sar_energy must be in"):
        resolve("mini", strategy="c-ta", overrides=["run.sar_energy=1.5"])
