"""Continual ISO-C / ISO-CTS / TSV-M / EpiMer (strategies/continual_multitask.py) against oracles written
here from the formulas (float64 LAPACK SVDs, an explicit-basis EpiMer), against the all-at-once
mergers on the same experts, and their state size against a bound from shapes, k and t."""

import math

import pytest
import torch

from cl_merge.errors import UserError
from cl_merge.merge_engine import MergeContext
from cl_merge.multitask_merge import kind_blocks, kind_matrix
from cl_merge.merge_engine import logical_bytes
from cl_merge.strategies.continual_multitask import ContinualEpiMer, ContinualIsoC, ContinualIsoCTS, ContinualTSV
from cl_merge.strategies.epimer import EpiMerMerger
from cl_merge.strategies.iso_merge import IsoCMerger, IsoCTSMerger
from cl_merge.strategies.tsv_merge import TSVMerger
from _svd_oracles import polar64 as _polar, svd64 as _svd

D = 8
SHAPES = {"blk.attn.in_proj_weight": (3 * D, D), "blk.mlp.c_fc.weight": (20, 12), "blk.mlp.c_fc.bias": (20,),
          "conv1.weight": (3, 2, 2, 2), "ln_post.weight": (12,)}
MATRICES = ("blk.attn.in_proj_weight", "blk.mlp.c_fc.weight")
T = 4


def _states(seed, tasks=T):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    experts = [{k: base[k] + 0.1 * torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(tasks)]
    fishers = [{k: torch.rand(s, generator=g) ** 3 + 1e-3 for k, s in SHAPES.items()} for _ in range(tasks)]
    return base, experts, fishers


def _continual(merger, base, experts, fishers=None, steps=None, sequential=False):
    """Run the rule through the executor step by step (in memory); return the deployed states."""
    merger.reset()
    deployed, out = base, []
    for t, expert in enumerate(experts[:steps], start=1):
        start = deployed if sequential else base
        ctx = MergeContext(step=t, tasks=len(experts), fisher=None if fishers is None else fishers[t - 1])
        deployed = merger.merge(base, deployed, expert, start, t, context=ctx)
        out.append(deployed)
    return out


def _blocks(name, tensor):
    return list(tensor.double().chunk(3, 0)) if name.endswith("in_proj_weight") else [tensor.double()]


def _close(a, b, tol=1e-5):
    assert float((a.double() - b.double()).norm()) / max(float(b.double().norm()), 1e-12) < tol


def _update(out, base, name):
    return (out[name] - base[name]).double()


def _same_as_at_once(continual, at_once, base, tol=1e-5):
    for name in base:
        _close(_update(continual, base, name), _update(at_once, base, name), tol)


# ---- ISO-C ------------------------------------------------------------------------------------

def test_c_iso_c_is_iso_c_of_the_tasks_seen():
    base, experts, _ = _states(0)
    steps = _continual(ContinualIsoC(alpha=0.7), base, experts)
    _same_as_at_once(steps[-1], IsoCMerger(alpha=0.7).merge_all(base, experts, matrix=kind_matrix,
                                                                blocks=kind_blocks), base)
    t = 2  # oracle after two of the four tasks: σ̄·UVᵀ of the sum per block, the mean elsewhere
    for name in SHAPES:
        deltas = [(e[name] - base[name]).double() for e in experts[:t]]
        if name in MATRICES:
            parts = []
            for block in zip(*[_blocks(name, d) for d in deltas]):
                u, s, v = _svd(sum(block))
                parts.append(0.7 * s.mean() * u @ v.T)
            expected = torch.cat(parts)
        else:
            expected = 0.7 * sum(deltas) / t
        _close(_update(steps[t - 1], base, name), expected)


def test_c_iso_c_keeps_one_model_sized_sum_under_the_sequential_protocol():
    base, experts, _ = _states(1)
    steps = _continual(ContinualIsoC(), base, experts, sequential=True)
    total, deployed = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}, base
    for t, e in enumerate(experts, start=1):  # τ_t = expert_t − deployed_{t−1}
        for n in SHAPES:
            total[n] = total[n] + (e[n] - deployed[n]).double()
        deployed = steps[t - 1]
    name = "blk.mlp.c_fc.weight"
    u, s, v = _svd(total[name])
    _close(_update(steps[-1], base, name), s.mean() * u @ v.T)
    _close(_update(steps[-1], base, "conv1.weight"), total["conv1.weight"] / T)
    merger = ContinualIsoC()
    _continual(merger, base, experts)
    assert logical_bytes(merger.state_dict()) == sum(4 * math.prod(s) for s in SHAPES.values())


# ---- ISO-CTS ----------------------------------------------------------------------------------

def _iso_cts_oracle(deltas, fraction):
    total = sum(deltas)
    r = min(total.shape)
    tasks = len(deltas)
    common = int(r * fraction)
    task_total = round((r - common) / tasks) * tasks
    common, s = r - task_total, task_total // tasks
    u, sig, v = _svd(total)
    uc, sc, vc = u[:, :common], sig[:common], v[:, :common]
    us, ss, vs = [], [], []
    for d in deltas:
        ut, st, vt = _svd(d - uc @ uc.T @ d)
        us.append(ut[:, :s]), ss.append(st[:s]), vs.append(vt[:, :s])
    u_all, v_all = torch.cat(us + [uc], 1), torch.cat(vs + [vc], 1)
    return torch.cat(ss + [sc]).sum() / r * _polar(u_all) @ _polar(v_all).T


def test_c_iso_cts_is_iso_cts_of_the_tasks_seen():
    base, experts, _ = _states(2)
    steps = _continual(ContinualIsoCTS(alpha=0.9, common_space_fraction=0.5), base, experts)
    _same_as_at_once(steps[-1], IsoCTSMerger(alpha=0.9, common_space_fraction=0.5).merge_all(
        base, experts, matrix=kind_matrix, blocks=kind_blocks), base)
    for t in (2, T):
        for name in MATRICES:
            deltas = [(e[name] - base[name]).double() for e in experts[:t]]
            parts = [0.9 * _iso_cts_oracle(list(b), 0.5) for b in zip(*[_blocks(name, d) for d in deltas])]
            _close(_update(steps[t - 1], base, name), torch.cat(parts), 1e-4)


# ---- TSV-M ------------------------------------------------------------------------------------

def _tsv_oracle(deltas, k):
    us, ss, vs = zip(*[_svd(d) for d in deltas])
    u = torch.cat([x[:, :k] for x in us], 1)
    v = torch.cat([x[:, :k] for x in vs], 1)
    s = torch.cat([x[:k] for x in ss])
    return _polar(u) @ torch.diag(s) @ _polar(v).T


def test_c_tsv_m_is_tsv_m_of_the_tasks_seen_with_the_runs_rank():
    base, experts, _ = _states(3)
    steps = _continual(ContinualTSV(alpha=0.8), base, experts)
    _same_as_at_once(steps[-1], TSVMerger(alpha=0.8).merge_all(base, experts, matrix=kind_matrix,
                                                               blocks=kind_blocks), base)
    for t in (1, 2):  # k = ⌊r/T⌋ with T the run's task count, whatever the step
        for name in MATRICES:
            deltas = [(e[name] - base[name]).double() for e in experts[:t]]
            parts = []
            for block in zip(*[_blocks(name, d) for d in deltas]):
                parts.append(0.8 * _tsv_oracle(list(block), min(block[0].shape) // T))
            _close(_update(steps[t - 1], base, name), torch.cat(parts), 1e-4)
        _close(_update(steps[t - 1], base, "conv1.weight"),
               0.8 * sum((e["conv1.weight"] - base["conv1.weight"]).double() for e in experts[:t]) / t)


def test_c_tsv_m_needs_the_runs_task_count():
    base, experts, _ = _states(4)
    merger = ContinualTSV()
    merger.reset()
    with pytest.raises(UserError, match="number of tasks"):
        merger.merge(base, base, experts[0], base, 1)


# ---- EpiMer -----------------------------------------------------------------------------------

def _epimer_oracle(deltas, fishers, k, alpha, eps):
    """Eq. 14 on an explicit basis: S = [vec(u_i v_iᵀ)] of the whitened per-task atoms, H_t = diag(F_t + ε),
    tagged coordinates (task t's σ on its own atoms), δ̃* = H̄⁻¹ Σ λ H̃_t δ̃_t, Δ = α·T·S δ̃*."""
    tasks = len(deltas)
    us, ss, vs = zip(*[_svd(d) for d in deltas])
    u = _polar(torch.cat([x[:, :k] for x in us], 1))
    v = _polar(torch.cat([x[:, :k] for x in vs], 1))
    p = u.shape[1]
    basis = torch.stack([torch.outer(u[:, i], v[:, i]).reshape(-1) for i in range(p)], 1)
    jitter = eps * float(torch.stack(fishers).double().mean())
    proj = [basis.T @ torch.diag(f.double().reshape(-1) + jitter) @ basis for f in fishers]
    coords = []
    for t in range(tasks):
        c = torch.zeros(p, dtype=torch.float64)
        c[t * k:(t + 1) * k] = ss[t][:k]
        coords.append(c)
    h_bar = sum(proj) / tasks
    b = sum(h @ c for h, c in zip(proj, coords)) / tasks
    x = torch.linalg.solve(h_bar, b)
    return alpha * tasks * (basis @ x).reshape(deltas[0].shape)


def test_c_epimer_is_epimer_of_the_tasks_seen():
    base, experts, fishers = _states(5)
    k = 2
    steps = _continual(ContinualEpiMer(k=k, alpha=0.6, eps=1e-3), base, experts, fishers)
    _same_as_at_once(steps[-1], EpiMerMerger(k=k, alpha=0.6, eps=1e-3).merge_all(
        base, experts, fishers=fishers, matrix=kind_matrix, blocks=kind_blocks), base, 1e-4)
    t = 3
    for name in MATRICES:
        deltas = [(e[name] - base[name]).double() for e in experts[:t]]
        fs = [f[name] for f in fishers[:t]]
        parts = [_epimer_oracle(list(db), list(fb), k, 0.6, 1e-3)
                 for db, fb in zip(zip(*[_blocks(name, d) for d in deltas]), zip(*[_blocks(name, f) for f in fs]))]
        _close(_update(steps[t - 1], base, name), torch.cat(parts), 1e-4)


def test_c_epimer_fisher_nonmatrix_rule_from_running_sums():
    base, experts, fishers = _states(6)
    steps = _continual(ContinualEpiMer(k=2, nonmatrix="fisher", eps=1e-2), base, experts, fishers)
    at_once = EpiMerMerger(k=2, nonmatrix="fisher", eps=1e-2).merge_all(
        base, experts, fishers=fishers, matrix=kind_matrix, blocks=kind_blocks)
    _same_as_at_once(steps[-1], at_once, base, 1e-4)
    name, t = "blk.mlp.c_fc.bias", 2
    deltas = [(e[name] - base[name]).double() for e in experts[:t]]
    fs = [f[name].double() for f in fishers[:t]]
    j = 1e-2 * float(torch.stack(fs).mean())
    expected = sum((f + j) * d for f, d in zip(fs, deltas)) / sum(f + j for f in fs)
    _close(_update(steps[t - 1], base, name), expected)


def test_c_epimer_refuses_a_step_without_a_fisher():
    base, experts, _ = _states(7)
    merger = ContinualEpiMer(k=2)
    merger.reset()
    with pytest.raises(UserError, match="Fisher"):
        merger.merge(base, base, experts[0], base, 1, context=MergeContext(step=1, tasks=T))


# ---- state size: the documented growth with t -------------------------------------------------

def _bound(kind, t, k=None):
    """Bytes after t steps from shapes, k and t: every matrix block (m_b × n_b) keeps at most k atoms per
    task, each (m_b + n_b + 1) float32 values + two int64 tags; ISO-CTS/EpiMer keep t full matrices."""
    total = 0
    for name, shape in SHAPES.items():
        if name not in MATRICES:
            total += 4 * math.prod(shape)  # the running sum
            continue
        blocks = 3 if name.endswith("in_proj_weight") else 1
        m, n = shape[0] // blocks, shape[1]
        kk = min(m, n) // T if k is None else min(k, min(m, n) // T)
        if kind in ("tsv", "epimer"):
            total += blocks * t * kk * (4 * (m + n + 1) + 2 * 8)
        if kind in ("cts", "epimer"):
            total += t * 4 * math.prod(shape)
    return total


@pytest.mark.parametrize("kind,merger", [("tsv", lambda: ContinualTSV()), ("cts", lambda: ContinualIsoCTS()),
                                         ("epimer", lambda: ContinualEpiMer(k=32))])
def test_state_grows_with_t_within_the_bound(kind, merger):
    base, experts, fishers = _states(8)
    m = merger()
    m.reset()
    deployed, sizes = base, []
    for t, e in enumerate(experts, start=1):
        deployed = m.merge(base, deployed, e, base, t, context=MergeContext(step=t, tasks=T, fisher=fishers[t - 1]))
        sizes.append(logical_bytes(m.state_dict()))
        assert sizes[-1] <= _bound(kind, t, 32 if kind == "epimer" else None)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # it grows: the documented exception
    if kind == "cts":  # exact: t full matrices, one sum elsewhere
        assert sizes[-1] == _bound(kind, T)
