"""Adaptive isotropic merge (SAIM Eq. 10–12) against the formula, written here with a plain SVD."""

import math

import pytest
import torch

from cl_merge.errors import UserError
from cl_merge.merge_engine import MergeContext
from cl_merge.registry import MERGERS

SHAPES = (("tall", (9, 5)), ("wide", (4, 7)), ("square", (6, 6)), ("bias", (6,)), ("conv", (3, 2, 2, 2)))


def rand_state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64).float() * scale for k, s in SHAPES}


def oracle(base, previous, expert, start, t, lam=0.0, alpha=1.0, eq10_everywhere=False):
    """Eq. 10–12 directly: one float64 SVD per 2-D matrix; the other tensors take the running mean
    ((t − 1) Δ_cum + (expert − θ0)) / t (ISO-C), or Δ_com itself with ``eq10_everywhere``."""
    out = {}
    for k in base:
        cum = previous[k].double() - base[k].double()
        com = (1 + lam) * cum + (1 - lam) * (expert[k].double() - start[k].double())
        if com.ndim == 2:
            u, s, vh = torch.linalg.svd(com, full_matrices=False)
            s_bar = s.mean()
            com = u @ torch.diag(s_bar + (s - s_bar) / math.sqrt(t)) @ vh
        elif not eq10_everywhere:
            com = ((t - 1) * cum + expert[k].double() - base[k].double()) / t
        out[k] = base[k].double() + alpha * com
    return out


def merge(merger, base, previous, expert, start, t):
    return merger.merge(base=base, previous=previous, expert=expert, start=start, step=t)


def close(a, b, tol=1e-5):
    return all(torch.allclose(a[k].double(), b[k].double(), rtol=tol, atol=tol) for k in b)


@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_merge_equals_the_formula_on_random_matrices(t):
    base, previous, expert = rand_state(0), rand_state(1), rand_state(2)
    merger = MERGERS.get("isotropic")()
    merger.reset(base)
    assert close(merge(merger, base, previous, expert, base, t), oracle(base, previous, expert, base, t))


def test_t1_keeps_the_spectrum_and_t4_halves_the_deviation_from_the_mean():
    base, previous, expert = rand_state(0), rand_state(1), rand_state(2)
    merger = MERGERS.get("isotropic")()
    merger.reset(base)
    for k in ("tall", "wide", "square"):
        com = (previous[k] - base[k] + expert[k] - base[k]).double()
        s = torch.linalg.svdvals(com)
        out1 = merge(merger, base, previous, expert, base, 1)[k].double() - base[k].double()
        assert torch.allclose(torch.linalg.svdvals(out1), s, atol=1e-5)
        out4 = merge(merger, base, previous, expert, base, 4)[k].double() - base[k].double()
        s4 = torch.linalg.svdvals(out4)
        assert torch.allclose(s4 - s.mean(), (s - s.mean()) / 2, atol=1e-5)
        assert torch.allclose(s4.mean(), s.mean(), atol=1e-5)  # σ̄ is preserved


def test_lambda_alpha_and_the_start_point_act_as_defined():
    base, previous, expert, start = rand_state(0), rand_state(1), rand_state(2), rand_state(3)
    merger = MERGERS.get("isotropic")(lam=0.25, alpha=0.7)
    merger.reset(base)
    out = merge(merger, base, previous, expert, start, 3)
    assert close(out, oracle(base, previous, expert, start, 3, lam=0.25, alpha=0.7))
    # non-2-D parameters: θ0 + α·running mean, λ plays no part there
    for k in ("bias", "conv"):
        mean = (2 * (previous[k] - base[k]) + (expert[k] - base[k])) / 3
        assert torch.allclose(out[k], base[k] + 0.7 * mean, atol=1e-6)
    literal = MERGERS.get("isotropic")(lam=0.25, alpha=0.7, preset="eq10")
    literal.reset(base)
    out = merge(literal, base, previous, expert, start, 3)
    assert close(out, oracle(base, previous, expert, start, 3, lam=0.25, alpha=0.7, eq10_everywhere=True))
    for k in ("bias", "conv"):  # Eq. 10 read literally: θ0 + α Δ_com exactly, whatever t
        com = 1.25 * (previous[k] - base[k]) + 0.75 * (expert[k] - start[k])
        assert torch.allclose(out[k], base[k] + 0.7 * com, atol=1e-6)


def test_running_mean_is_the_task_mean_independently_and_swa_sequentially():
    """Non-matrix tensors, O(1) state: independent (start = θ0) → mean of the task vectors; sequential
    (start = previous) → M_t = M_{t−1} + τ_t / t."""
    base = rand_state(0)
    taus = [rand_state(10 + i) for i in range(4)]
    merger = MERGERS.get("isotropic")()
    merger.reset(base)
    deployed = base
    for t, tau in enumerate(taus, start=1):
        deployed = merge(merger, base, deployed, {k: base[k] + tau[k] for k in base}, base, t)
    for k in ("bias", "conv"):
        assert torch.allclose(deployed[k] - base[k], sum(x[k] for x in taus) / 4, atol=1e-6)
    deployed = base
    for t, tau in enumerate(taus, start=1):
        prev_m = {k: deployed[k] - base[k] for k in base}
        deployed = merge(merger, base, deployed, {k: deployed[k] + tau[k] for k in base}, deployed, t)
        for k in ("bias", "conv"):
            assert torch.allclose(deployed[k] - base[k], prev_m[k] + tau[k] / t, atol=1e-6)


def test_conv_as_matrix_reshapes_the_kernel_and_stacked_qkv_is_one_matrix():
    g = torch.Generator().manual_seed(3)
    base = {"conv1.weight": torch.zeros(6, 3, 2, 2), "attn.in_proj_weight": torch.zeros(12, 4)}
    expert = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    prev = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}

    def eq11(m, t=4):
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        return u @ torch.diag(s.mean() + (s - s.mean()) / math.sqrt(t)) @ vh

    out = merge(MERGERS.get("isotropic")(conv="matrix", qkv="stacked"), base, prev, expert, base, 4)
    com = {k: prev[k] + expert[k] for k in base}
    assert torch.allclose(out["conv1.weight"].double(), eq11(com["conv1.weight"].reshape(6, 12)).reshape(6, 3, 2, 2),
                          atol=1e-5)
    assert torch.allclose(out["attn.in_proj_weight"].double(), eq11(com["attn.in_proj_weight"]), atol=1e-5)
    out = merge(MERGERS.get("isotropic")(), base, prev, expert, base, 4)  # default: q, k, v one by one
    blocks = [eq11(b) for b in com["attn.in_proj_weight"].split(4)]
    assert torch.allclose(out["attn.in_proj_weight"].double(), torch.cat(blocks), atol=1e-5)


def test_sequential_lambda_zero_merges_expert_minus_theta0():
    """With start = previous (sequential) and λ = 0, Δ_com = expert − θ0."""
    base, previous, expert = rand_state(0), rand_state(1), rand_state(2)
    merger = MERGERS.get("isotropic")()
    merger.reset(base)
    out = merge(merger, base, previous, expert, previous, 2)
    matrices = [k for k in base if base[k].ndim == 2]
    assert close({k: out[k] for k in matrices}, {k: v for k, v in oracle(base, base, expert, base, 2).items() if k in matrices})
    assert close(out, oracle(base, previous, expert, previous, 2))


def test_rank_deficient_update_stays_in_its_row_and_column_spaces():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.zeros(8, 6)}
    low = torch.randn(8, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank 2
    merger = MERGERS.get("isotropic")()
    merger.reset(base)
    out = merge(merger, base, base, {"w": low}, base, 4)["w"].double()
    u, s, vh = torch.linalg.svd(low.double())
    u2, v2 = u[:, :2], vh[:2].T
    assert torch.allclose(u2 @ (u2.T @ out), out, atol=1e-5)  # column space of Δ_com
    assert torch.allclose(out @ v2 @ v2.T, out, atol=1e-5)  # row space of Δ_com
    s_bar = s.sum() / 6  # σ̄ averages all min(m, n) = 6 singular values (4 of them zero)
    expected = u2 @ torch.diag(s_bar + (s[:2] - s_bar) / 2) @ v2.T
    assert torch.allclose(out, expected, atol=1e-5)
    zero = merge(merger, base, base, base, base, 4)["w"]  # no update at all: nothing is added
    assert torch.equal(zero, base["w"])


def test_ill_conditioned_matrices_take_the_float64_route():
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, 30, dtype=torch.float64)  # condition number 1e4
    com = (u[:, :30] * s) @ v.T
    base = {"w": torch.zeros(40, 30)}
    merger = MERGERS.get("isotropic")()
    merger.reset(base)
    out = merge(merger, base, base, {"w": com.float()}, base, 9)["w"].double()
    ref = oracle(base, base, {"w": com.float()}, base, 9)["w"]
    # a float32 SVD of the same input is off by ~3e-5 here
    assert float((out - ref).norm() / ref.norm()) < 1e-6


def test_merger_keeps_no_state_and_survives_a_checkpoint():
    base, previous, expert = rand_state(0), rand_state(1), rand_state(2)
    a, b = MERGERS.get("isotropic")(), MERGERS.get("isotropic")()
    a.reset(base)
    merge(a, base, base, previous, base, 1)
    assert a.state_dict() == {}
    b.reset(base)
    b.load_state_dict(a.state_dict())
    assert close(merge(a, base, previous, expert, base, 2), merge(b, base, previous, expert, base, 2), tol=0)


def test_alpha_grid_picks_the_best_scoring_alpha_and_needs_a_scorer():
    base, previous, expert = rand_state(0), rand_state(1), rand_state(2)
    merger = MERGERS.get("isotropic")(alpha_grid=(0.5, 1.0, 1.5))
    merger.reset(base)
    with pytest.raises(UserError):
        merge(merger, base, previous, expert, base, 2)
    target = oracle(base, previous, expert, base, 2, alpha=1.0)
    seen = []

    def score(state):  # best when the deployed model is the α = 1 one
        seen.append(state)
        return -sum(float((state[k].double() - target[k]).norm()) for k in state)

    context = MergeContext(step=2, validation_score=score)
    out = merger.merge(base=base, previous=previous, expert=expert, start=base, step=2, context=context)
    assert len(seen) == 3 and context.record["chosen_alpha"] == 1.0
    assert close(out, target)
