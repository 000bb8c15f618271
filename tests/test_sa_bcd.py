"""SA-BCD (SAIM Alg. 1) against a step computed by hand in this file, for both update readings."""

import math

import pytest
import torch

from cl_merge.registry import LEARNERS

P, RHO, LR, WD, B1, B2, EPS = 0.3, 0.05, 0.1, 0.01, 0.9, 0.999, 1e-8


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(5, generator=g) * 0.1,
              "v": torch.randn(3, 5, generator=g)}
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)

    def loss_fn(p, batch):
        xb, yb = x[batch].to(p["w"].dtype), y[batch].to(p["w"].dtype)
        return ((torch.tanh(xb @ p["w"].T + p["b"]) @ p["v"].T - yb) ** 2).mean()

    return params, loss_fn


BATCHES = [torch.arange(0, 8), torch.arange(8, 16), torch.arange(4, 12)]


def grad(loss_fn, p, batch):
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    gs = torch.autograd.grad(loss_fn(q, batch), list(q.values()))
    return dict(zip(q, gs))


def top(score, k):
    """Indices of the k largest |score| (a sort, independent of the implementation's selection)."""
    order = torch.sort(score.reshape(-1).abs(), descending=True, stable=True).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(score)


def oracle_steps(params, loss_fn, update, scope, decay="selected"):
    """Algorithm 1, float64, written out step by step; returns (params, per-step Ω, per-step ε)."""
    p = {k: v.double().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v = {k: torch.zeros_like(t) for k, t in p.items()}
    omegas, epsilons = [], []
    for t, batch in enumerate(BATCHES, start=1):
        g = grad(loss_fn, p, batch)
        if update == "literal":
            m = {k: B1 * m[k] + (1 - B1) * g[k] for k in p}
            v = {k: B2 * v[k] + (1 - B2) * g[k] ** 2 for k in p}
            score = m
        else:
            score = {k: B1 * m[k] + (1 - B1) * g[k] for k in p}
        if scope == "tensor":
            omega = {k: top(score[k], math.ceil(P * score[k].numel() - 1e-9)) for k in p}
        else:
            flat = torch.cat([score[k].reshape(-1) for k in p])
            allm = top(flat, math.ceil(P * flat.numel() - 1e-9)).split([score[k].numel() for k in p])
            omega = {k: mk.view_as(score[k]) for k, mk in zip(p, allm)}
        g_sel = {k: g[k] * omega[k] for k in p}
        norm = math.sqrt(sum(float((g_sel[k] ** 2).sum()) for k in p))
        eps = {k: RHO * g_sel[k] / norm for k in p}
        g2 = grad(loss_fn, {k: p[k] + eps[k] for k in p}, batch)
        omegas.append(omega)
        epsilons.append(eps)
        new = {}
        for k in p:
            if update == "literal":
                step = (m[k] / (1 - B1 ** t)) / torch.sqrt(v[k] / (1 - B2 ** t) + EPS) * g2[k]
            else:
                m[k] = B1 * m[k] + (1 - B1) * g2[k]
                v[k] = B2 * v[k] + (1 - B2) * g2[k] ** 2
                step = (m[k] / (1 - B1 ** t)) / (torch.sqrt(v[k] / (1 - B2 ** t)) + EPS)
            decayed = p[k] * (1 - LR * WD) if decay == "all" else torch.where(omega[k], p[k] * (1 - LR * WD), p[k])
            new[k] = torch.where(omega[k], decayed - LR * step, decayed)
        p = new
    return p, omegas, epsilons


def run_optimizer(params, loss_fn, **kw):
    learner = LEARNERS.get("sa_bcd")(lr=LR, weight_decay=WD, rho=RHO, p=P, **kw)
    live = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = learner.make_optimizer(list(live.values()))
    before, perturbed = [], []
    for batch in BATCHES:
        calls = []

        def closure(batch=batch):
            opt.zero_grad(set_to_none=True)
            calls.append({k: q.detach().clone() for k, q in live.items()})
            loss = loss_fn(live, batch)
            loss.backward()
            return loss

        before.append({k: q.detach().clone() for k, q in live.items()})
        opt.step(closure)
        assert len(calls) == 2  # two gradient evaluations per step
        perturbed.append({k: calls[1][k] - calls[0][k] for k in live})
    return {k: q.detach() for k, q in live.items()}, before, perturbed


@pytest.mark.parametrize("update", ["literal", "sam_adam"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_steps_equal_the_hand_computed_algorithm(update, scope):
    params, loss_fn = problem()
    expected, omegas, epsilons = oracle_steps(params, loss_fn, update, scope)
    got, before, perturbation = run_optimizer(params, loss_fn, update=update, scope=scope)
    for k in params:
        assert torch.allclose(got[k].double(), expected[k], atol=1e-6, rtol=1e-5), k
    for t in range(len(BATCHES)):
        # the perturbation is ε* = ρ g_Ω/‖g_Ω‖: norm ρ, supported on Ω
        norm = math.sqrt(sum(float((perturbation[t][k].double() ** 2).sum()) for k in params))
        assert norm == pytest.approx(RHO, rel=1e-4)
        for k in params:
            assert torch.allclose(perturbation[t][k].double(), epsilons[t][k], atol=1e-6)
            assert not perturbation[t][k][~omegas[t][k]].any()
        # only Ω moves (Θ restored exactly after the second evaluation)
        after = got if t == len(BATCHES) - 1 else before[t + 1]
        for k in params:
            changed = after[k] != before[t][k]
            assert torch.equal(changed, omegas[t][k]), (t, k)


def test_selection_sizes_per_tensor_and_global():
    params, loss_fn = problem()
    _, omegas, _ = oracle_steps(params, loss_fn, "sam_adam", "tensor")
    assert [int(omegas[0][k].sum()) for k in params] == [6, 2, 5]  # ⌈0.3·n⌉ of 20, 5, 15 entries
    _, omegas, _ = oracle_steps(params, loss_fn, "sam_adam", "global")
    assert sum(int(omegas[0][k].sum()) for k in params) == 12


def test_decay_all_decays_every_coordinate():
    params, loss_fn = problem(1)
    expected, _, _ = oracle_steps(params, loss_fn, "sam_adam", "tensor", decay="all")
    got, _, _ = run_optimizer(params, loss_fn, update="sam_adam", scope="tensor", decay="all")
    for k in params:
        assert torch.allclose(got[k].double(), expected[k], atol=1e-6, rtol=1e-5), k


def test_ties_select_exactly_k_coordinates():
    from cl_merge.strategies.sa_bcd import top_mask

    score = torch.tensor([0.0, -2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert top_mask(score, 3).tolist() == [1, 1, 0, 0, 1] + [0] * 5  # by |score|, ties → lower index
    assert top_mask(score.double(), 1).tolist() == [0, 1] + [0] * 8


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError):
        LEARNERS.get("sa_bcd")(p=0.0)
    with pytest.raises(ValueError):
        LEARNERS.get("sa_bcd")(rho=-1.0)


def _sorted_selection(score: torch.Tensor, k: int) -> torch.Tensor:
    """Oracle: order by (−|score|, index) with a stable sort in float64, keep the first k."""
    flat = score.detach().reshape(-1).double().abs()
    order = torch.sort(-flat, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return keep.view(score.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("values", ["continuous", "few_levels", "zeros"])
def test_top_mask_is_the_exact_top_k_including_ties(dtype, values):
    """The selection equals a full sort (ties at the threshold → lower index) and keeps exactly k
    entries, on random inputs with heavy ties; the k entries also carry torch.topk's values."""
    from cl_merge.strategies.sa_bcd import selection_size, top_mask

    g = torch.Generator().manual_seed(11)
    for trial in range(20):
        n = int(torch.randint(1, 400, (1,), generator=g))
        if values == "continuous":
            score = torch.randn(n, generator=g, dtype=torch.float64)
        elif values == "few_levels":  # many exact ties, both signs (|−2| ties with |2|)
            score = torch.randint(-3, 4, (n,), generator=g).double()
        else:
            score = torch.zeros(n, dtype=torch.float64)
            score[torch.randint(0, n, (max(1, n // 10),), generator=g)] = 1.0
        score = score.to(dtype).reshape(-1, 1) if trial % 2 else score.to(dtype)
        for p in (0.01, 0.3, 0.5, 0.97, 1.0):
            k = selection_size(p, n)
            got = top_mask(score, k).bool()
            assert int(got.sum()) == k
            assert torch.equal(got, _sorted_selection(score, k)), (trial, p)
            top_vals = torch.topk(score.reshape(-1).abs(), k).values
            assert torch.equal(torch.sort(score.reshape(-1).abs()[got.reshape(-1)]).values,
                               torch.sort(top_vals).values)


def test_optimizer_selection_equals_the_sort_oracle_per_tensor_and_global():
    """Ω inside SABCD.step (both scopes) is the sort oracle's set on the provisional momentum."""
    from cl_merge.strategies.sa_bcd import SABCD, selection_size

    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(7, 5, generator=g)), torch.nn.Parameter(torch.randn(13, generator=g))]
    for scope in ("tensor", "global"):
        opt = SABCD(params, lr=1e-3, p=0.3, scope=scope)
        grads = [torch.randint(-2, 3, p.shape, generator=g).float() for p in params]  # ties

        def closure():
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            return torch.tensor(0.0)

        opt.step(closure)
        b1 = opt.param_groups[0]["betas"][0]
        scores = [(1 - b1) * gr for gr in grads]  # m̃ at the first step (m = 0)
        masks = [opt.state[p]["mask"].bool() for p in params]
        if scope == "tensor":
            for s, m in zip(scores, masks):
                assert torch.equal(m, _sorted_selection(s, selection_size(0.3, s.numel())))
        else:
            flat = torch.cat([s.reshape(-1) for s in scores])
            want = _sorted_selection(flat, selection_size(0.3, flat.numel()))
            assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fused kernel / unfused code
def test_coordinates_off_the_selection_are_bit_for_bit_unchanged(dtype):
    from cl_merge.strategies.sa_bcd import SABCD

    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(40, 30, generator=g, dtype=dtype))
    x = torch.randn(16, 30, generator=g, dtype=dtype)
    opt = SABCD([w], lr=1e-2, p=0.2, rho=0.1)
    assert opt._fusable([(opt.param_groups[0], [w], [opt._state(w)])]) == (dtype == torch.float32)
    for _ in range(3):
        before = w.detach().clone()

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = (x @ w.T).square().mean()
            loss.backward()
            return loss

        opt.step(closure)
        off = ~opt.state[w]["mask"].bool()
        assert torch.equal(w.detach()[off], before[off])
        assert bool((w.detach()[~off] != before[~off]).all())
