"""SAM and ASAM learners: one step against the perturbation + AdamW step written out here."""

import math

import pytest
import torch

from cl_merge.registry import LEARNERS

LR, WD, B1, B2, EPS = 0.05, 0.01, 0.9, 0.999, 1e-8


def problem():
    g = torch.Generator().manual_seed(3)
    params = {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g),
              "proj": torch.randn(2, 4, generator=g)}
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, 2, generator=g)

    def loss_fn(p):
        return ((torch.tanh(x.to(p["proj"].dtype) @ p["layer.weight"].T + p["layer.bias"]) @ p["proj"].T
                 - y.to(p["proj"].dtype)) ** 2).mean()

    return params, loss_fn


def grad(loss_fn, p):
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    return dict(zip(q, torch.autograd.grad(loss_fn(q), list(q.values()))))


def oracle(params, loss_fn, rho, eta=None, steps=2):
    """SAM (eta None) / ASAM: ε = ρ T²g/‖Tg‖ with T = |θ| + η on non-biases, then AdamW with g′."""
    p = {k: v.double().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v = {k: torch.zeros_like(t) for k, t in p.items()}
    perturbations = []
    for t in range(1, steps + 1):
        g = grad(loss_fn, p)
        T = {k: (p[k].abs() + eta if eta is not None and "bias" not in k else torch.ones_like(p[k])) for k in p}
        norm = math.sqrt(sum(float(((T[k] * g[k]) ** 2).sum()) for k in p))
        eps = {k: rho * T[k] ** 2 * g[k] / norm for k in p}
        perturbations.append(eps)
        g2 = grad(loss_fn, {k: p[k] + eps[k] for k in p})
        for k in p:
            m[k] = B1 * m[k] + (1 - B1) * g2[k]
            v[k] = B2 * v[k] + (1 - B2) * g2[k] ** 2
            p[k] = p[k] * (1 - LR * WD) - LR * (m[k] / (1 - B1 ** t)) / (torch.sqrt(v[k] / (1 - B2 ** t)) + EPS)
    return p, perturbations


def run(name, params, loss_fn, steps=2, **kw):
    from cl_merge.learner import FitContext

    learner = LEARNERS.get(name)(lr=LR, weight_decay=WD, **kw)
    live = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = learner.make_optimizer(list(live.values()))
    learner.before_training_exp(FitContext(adapter=None, task=None, step=1, seed=0, params=live, optimizer=opt))
    perturbations = []
    for _ in range(steps):
        seen = []

        def closure():
            opt.zero_grad(set_to_none=True)
            seen.append({k: q.detach().clone() for k, q in live.items()})
            loss = loss_fn(live)
            loss.backward()
            return loss

        opt.step(closure)
        assert len(seen) == 2
        perturbations.append({k: seen[1][k] - seen[0][k] for k in live})
    return {k: q.detach() for k, q in live.items()}, perturbations


@pytest.mark.parametrize("name,rho,eta", [("sam", 0.05, None), ("asam", 0.5, 0.01)])
def test_step_equals_the_perturbed_adamw_step(name, rho, eta):
    params, loss_fn = problem()
    expected, eps_expected = oracle(params, loss_fn, rho, eta)
    got, eps_got = run(name, params, loss_fn)
    for k in params:
        assert torch.allclose(got[k].double(), expected[k], atol=1e-6, rtol=1e-5), k
    for e_got, e_exp in zip(eps_got, eps_expected):
        for k in params:
            assert torch.allclose(e_got[k].double(), e_exp[k], atol=1e-6), k


def test_sam_perturbation_has_norm_rho_and_asam_has_adaptive_norm_rho():
    params, loss_fn = problem()
    _, eps = run("sam", params, loss_fn, steps=1)
    assert math.sqrt(sum(float((e.double() ** 2).sum()) for e in eps[0].values())) == pytest.approx(0.05, rel=1e-4)
    _, eps = run("asam", params, loss_fn, steps=1, rho=0.3, eta=0.02)
    # ‖T⁻¹ε‖ = ρ, with T = |θ| + η on weights and 1 on the bias
    scaled = [eps[0][k].double() / (params[k].double().abs() + 0.02) if "bias" not in k else eps[0][k].double()
              for k in params]
    assert math.sqrt(sum(float((s ** 2).sum()) for s in scaled)) == pytest.approx(0.3, rel=1e-4)


def test_hyperparameters_are_exposed():
    assert set(LEARNERS.get("asam").hyperparameters()) >= {"rho", "eta", "lr", "weight_decay"}
    assert "eta" not in LEARNERS.get("sam").hyperparameters()
    assert LEARNERS.get("sam")().rho == 0.05 and LEARNERS.get("asam")().rho == 0.5
