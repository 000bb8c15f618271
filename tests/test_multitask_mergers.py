"""All-at-once mergers against oracles written here from the papers' formulas (float64 LAPACK SVDs,
explicit subspace bases), on small random tensors; EpiMer's limits as its supplement states them."""

import pytest
import torch

from cl_merge.errors import UserError
from cl_merge.strategies.dare import DareMerger
from cl_merge.strategies.epimer import EpiMerMerger, epimer_matrix, subspace_frechet
from cl_merge.strategies.fisher_merge import FisherMerger, fisher_average
from cl_merge.strategies.iso_merge import IsoCMerger, IsoCTSMerger
from cl_merge.strategies.tsv_merge import TSVMerger
from _svd_oracles import polar64 as _polar, svd64 as _svd

SHAPES = {"w": (24, 16), "wide": (12, 20), "bias": (24,), "conv": (3, 2, 2, 2)}
T = 4


def _states(seed, tasks=T, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: base[k] + 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(tasks)]
    fishers = [{k: torch.rand(s, generator=g) ** 3 + 1e-3 for k, s in shapes.items()} for _ in range(tasks)]
    return base, experts, fishers


def _deltas(base, experts, name):
    return [(e[name] - base[name]).double() for e in experts]


def _merged_delta(out, base, name):
    return (out[name] - base[name]).double()


def _close(a, b, tol=1e-5):
    scale = max(float(b.norm()), 1e-12)
    assert float((a.double() - b.double()).norm()) / scale < tol


# ---- ISO-C / ISO-CTS --------------------------------------------------------------------------

def test_iso_c_oracle():
    base, experts, _ = _states(0)
    out = IsoCMerger(alpha=0.7).merge_all(base, experts)
    for name in ("w", "wide"):
        u, s, v = _svd(sum(_deltas(base, experts, name)))
        _close(_merged_delta(out, base, name), 0.7 * s.mean() * u @ v.T)
    for name in ("bias", "conv"):
        _close(_merged_delta(out, base, name), 0.7 * torch.stack(_deltas(base, experts, name)).mean(0))


def _iso_cts_oracle(deltas, fraction):
    total = sum(deltas)
    r = min(total.shape)
    c = int(r * fraction)
    c = r - round((r - c) / len(deltas)) * len(deltas)
    s_per = (r - c) // len(deltas)
    u, s, v = _svd(total)
    uc, sc, vc = u[:, :c], s[:c], v[:, :c]
    us, ss, vs = [uc], [sc], [vc]
    for d in deltas:
        ut, st, vt = _svd(d - uc @ uc.T @ d)
        us.append(ut[:, :s_per]), ss.append(st[:s_per]), vs.append(vt[:, :s_per])
    sigma = torch.cat(ss).mean()
    return sigma * _polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 1)).T


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_oracle(fraction):
    base, experts, _ = _states(1)
    out = IsoCTSMerger(alpha=1.0, common_space_fraction=fraction).merge_all(base, experts)
    for name in ("w", "wide"):
        _close(_merged_delta(out, base, name), _iso_cts_oracle(_deltas(base, experts, name), fraction))
    _close(_merged_delta(out, base, "bias"), torch.stack(_deltas(base, experts, "bias")).mean(0))


def test_iso_cts_with_only_the_common_space_is_iso_c():
    base, experts, _ = _states(16)
    a = IsoCTSMerger(common_space_fraction=1.0).merge_all(base, experts)
    b = IsoCMerger().merge_all(base, experts)
    for k in base:
        _close(a[k] - base[k], b[k] - base[k])


# ---- TSV-M ------------------------------------------------------------------------------------

def _tsv_oracle(deltas, k):
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, v = _svd(d)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(v[:, :k])
    return (_polar(torch.cat(us, 1)) * torch.cat(ss)) @ _polar(torch.cat(vs, 1)).T


@pytest.mark.parametrize("k", [None, 2])
def test_tsv_m_oracle(k):
    base, experts, _ = _states(2)
    out = TSVMerger(alpha=0.8, k=k).merge_all(base, experts)
    for name in ("w", "wide"):
        rank = min(base[name].shape) // T if k is None else k  # FusionBench: int(r / T)
        _close(_merged_delta(out, base, name), 0.8 * _tsv_oracle(_deltas(base, experts, name), rank))
    for name in ("bias", "conv"):
        _close(_merged_delta(out, base, name), 0.8 * torch.stack(_deltas(base, experts, name)).mean(0))


def test_tsv_m_matrix_smaller_than_task_count_is_averaged():
    base, experts, _ = _states(3, tasks=6, shapes={"w": (5, 4)})
    out = TSVMerger().merge_all(base, experts)
    _close(_merged_delta(out, base, "w"), torch.stack(_deltas(base, experts, "w")).mean(0))


# ---- Fisher averaging -------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_averaging_oracle(normalize):
    base, experts, fishers = _states(4)
    m = 1e-6
    out = FisherMerger(normalize=normalize, minimal_fisher_weight=m).merge_all(base, experts, fishers=fishers)
    if normalize:
        norms = torch.tensor([torch.cat([f[k].double().flatten() for k in base]).norm() for f in fishers])
        nu = (1 / (norms + m)) / (1 / (norms + m)).sum()
    else:
        nu = torch.ones(T, dtype=torch.float64)
    for name in base:
        num = sum(nu[t] * (fishers[t][name].double() + m) * experts[t][name].double() for t in range(T))
        den = sum(nu[t] * (fishers[t][name].double() + m) for t in range(T))
        _close(out[name].double(), num / den, tol=1e-6)


# ---- DARE -------------------------------------------------------------------------------------

def test_dare_is_reproducible_and_seeded():
    base, experts, _ = _states(5)
    a = DareMerger(seed=3).merge_all(base, experts)
    b = DareMerger(seed=3).merge_all(base, experts)
    c = DareMerger(seed=4).merge_all(base, experts)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert any(not torch.equal(a[k], c[k]) for k in base)
    # masks do not depend on which other tensors are merged (per-tensor rule, streamable)
    sub = DareMerger(seed=3).merge_all({"w": base["w"]}, [{"w": e["w"]} for e in experts])
    assert torch.equal(sub["w"], a["w"])


def test_dare_drop_rate_and_rescale():
    base, experts, _ = _states(6, tasks=1, shapes={"w": (200, 100)})
    delta = experts[0]["w"] - base["w"]
    out = DareMerger(drop_rate=0.3, alpha=1.0).merge_all(base, experts)
    d = out["w"] - base["w"]
    kept = d != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.01
    assert torch.allclose(d[kept], delta[kept] / 0.7, atol=1e-6)  # θ0 + Δ − θ0 rounds at ~1e-7
    plain = DareMerger(drop_rate=0.3, alpha=1.0, rescale=False).merge_all(base, experts)
    assert torch.allclose((plain["w"] - base["w"])[kept], delta[kept], atol=1e-6)


def test_dare_rescale_is_unbiased():
    base, experts, _ = _states(7, tasks=2, shapes={"w": (8, 6), "bias": (8,)})
    ta = {k: 0.3 * sum(e[k] - base[k] for e in experts) for k in base}
    runs = [DareMerger(drop_rate=0.5, seed=s).merge_all(base, experts) for s in range(2000)]
    for k in base:
        avg = torch.stack([r[k] - base[k] for r in runs]).mean(0)
        # standard error of the mean of 2000 draws: 0.3·|δ|·1/sqrt(2000) per task, ≈ 0.0009 here
        assert float((avg - ta[k]).abs().max()) < 0.01


def _ties_oracle(rows, keep):
    flat = torch.stack([torch.cat([r[k].flatten() for k in r]) for r in rows])
    d = flat.shape[1]
    thr = flat.abs().kthvalue(d - int(d * keep), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= thr)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0)
    out, i = {}, 0
    for k, v in rows[0].items():
        out[k] = merged[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def test_dare_ties_without_drop_is_ties():
    base, experts, _ = _states(8)
    out = DareMerger(drop_rate=0.0, combine="ties", alpha=0.5).merge_all(base, experts)
    ref = _ties_oracle([{k: e[k] - base[k] for k in base} for e in experts], 0.2)
    for k in base:
        _close(_merged_delta(out, base, k), 0.5 * ref[k], tol=1e-6)


# ---- EpiMer -----------------------------------------------------------------------------------

def _epimer_oracle(deltas, fishers, k, alpha, eps, aggregator, coefficients="tagged"):
    """Eq. 13/14 with S formed explicitly: columns vec(u_i v_iᵀ) of the whitened per-task atoms."""
    us, ss, vs, owner = [], [], [], []
    for t, d in enumerate(deltas):
        u, s, v = _svd(d)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(v[:, :k])
        owner += [t] * k
    U, V, sig = _polar(torch.cat(us, 1)), _polar(torch.cat(vs, 1)), torch.cat(ss)
    S = torch.stack([torch.outer(U[:, i], V[:, i]).flatten() for i in range(U.shape[1])], 1)
    owner = torch.tensor(owner)
    lam = 1.0 / len(deltas)
    H = [S.T @ torch.diag(f.double().flatten() + eps) @ S for f in fishers]
    if coefficients == "tagged":
        coords = [torch.where(owner == t, sig, 0.0) for t in range(len(deltas))]
    else:
        coords = [S.T @ d.flatten() for d in deltas]
    H_bar = sum(lam * h for h in H)
    x = torch.linalg.solve(H_bar, sum(lam * h @ c for h, c in zip(H, coords)))
    scale = alpha * (len(deltas) if aggregator == "frechet_sum" else 1.0)
    return (S @ (scale * x)).reshape(deltas[0].shape)


@pytest.mark.parametrize("aggregator", ["frechet_sum", "frechet_mean"])
@pytest.mark.parametrize("coefficients", ["tagged", "projected"])
def test_epimer_oracle(aggregator, coefficients):
    base, experts, fishers = _states(9)
    merger = EpiMerMerger(k=3, alpha=0.9, eps=1e-3, eps_scale="absolute", aggregator=aggregator,
                          coefficients=coefficients)
    out = merger.merge_all(base, experts, fishers=fishers)
    for name in ("w", "wide"):
        ref = _epimer_oracle(_deltas(base, experts, name), [f[name] for f in fishers], 3, 0.9, 1e-3,
                             aggregator, coefficients)
        _close(_merged_delta(out, base, name), ref, tol=1e-4)
    for name in ("bias", "conv"):  # TSV-M's non-matrix rule by default
        _close(_merged_delta(out, base, name), 0.9 * torch.stack(_deltas(base, experts, name)).mean(0))


def test_epimer_relative_jitter_is_scale_invariant():
    base, experts, fishers = _states(10)
    merger = EpiMerMerger(k=3)
    a = merger.merge_all(base, experts, fishers=fishers)
    b = merger.merge_all(base, experts, fishers=[{k: 1e-4 * v for k, v in f.items()} for f in fishers])
    for k in base:
        _close(a[k] - base[k], b[k] - base[k], tol=1e-4)
    # relative ε is ε·mean(v̄) of the layer: the same as the absolute jitter of that size
    deltas = [d.float() for d in _deltas(base, experts, "w")]
    fs = [f["w"] for f in fishers]
    jitter = 1e-6 * float(torch.stack(fs).double().mean())
    _close(epimer_matrix(deltas, fs, 3), epimer_matrix(deltas, fs, 3, eps=jitter, eps_scale="absolute"))


def test_epimer_homogeneous_curvature_is_tsv_m():
    """H̃_t ≡ H̄ (every task the same, non-uniform Fisher): Eq. 14 collapses to α Σ δ̃_t = α·TSV-M."""
    base, experts, fishers = _states(11)
    same = [fishers[0]] * T
    merger = EpiMerMerger(k=2, alpha=0.7)
    epi = merger.merge_all(base, experts, fishers=same)
    tsv = TSVMerger(k=2, alpha=0.7).merge_all(base, experts)
    for k in base:
        _close(epi[k] - base[k], tsv[k] - base[k], tol=1e-4)
    assert all(abs(eta) < 1e-8 for eta in merger.diagnostics.values())
    # heterogeneous curvature: a different merge, and the diagnostic η = cᵀH̄⁻¹c is positive
    merger.merge_all(base, experts, fishers=fishers)
    assert all(eta > 0 for eta in merger.diagnostics.values())


def test_epimer_identity_basis_with_diagonal_curvature_is_fisher_averaging():
    """Case 2: S = I, H̃_t = diag(F_t) — Eq. 13 is the per-coordinate Fisher-weighted average."""
    g = torch.Generator().manual_seed(12)
    d = 10
    deltas = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(T)]
    fs = [torch.rand(d, generator=g, dtype=torch.float64) + 0.01 for _ in range(T)]
    got = subspace_frechet(torch.eye(d, dtype=torch.float64), [torch.diag(f) for f in fs], deltas, [1 / T] * T)
    ref = fisher_average(deltas, fs, [1 / T] * T, 0.0)
    _close(got, ref, tol=1e-12)
    # and EpiMer's non-matrix option is exactly that rule (with its jitter)
    base, experts, fishers = _states(13)
    out = EpiMerMerger(nonmatrix="fisher", eps=1e-9, alpha=1.0).merge_all(base, experts, fishers=fishers)
    ref = fisher_average(_deltas(base, experts, "bias"), [f["bias"].double() for f in fishers], [1 / T] * T, 0.0)
    _close(_merged_delta(out, base, "bias"), ref, tol=1e-5)


def test_epimer_implementation_matches_explicit_basis_reference():
    """The atom-structured solve equals ``subspace_frechet`` on the explicit S (Eq. 13, mean)."""
    base, experts, fishers = _states(14)
    deltas = [d.float() for d in _deltas(base, experts, "w")]
    fs = [f["w"] for f in fishers]
    got = epimer_matrix(deltas, fs, 2, eps=1e-3, eps_scale="absolute", aggregator="frechet_mean")
    ref_sum = _epimer_oracle(_deltas(base, experts, "w"), fs, 2, 1.0, 1e-3, "frechet_mean")
    us, vs, owner, sig = [], [], [], []
    for t, d in enumerate(deltas):
        u, s, v = _svd(d)
        us.append(u[:, :2]), vs.append(v[:, :2]), sig.append(s[:2])
        owner += [t, t]
    U, V = _polar(torch.cat(us, 1)), _polar(torch.cat(vs, 1))
    S = torch.stack([torch.outer(U[:, i], V[:, i]).flatten() for i in range(U.shape[1])], 1)
    owner, sig = torch.tensor(owner), torch.cat(sig)
    coords = [torch.where(owner == t, sig, 0.0) for t in range(T)]
    ref = subspace_frechet(S, [torch.diag(f.double().flatten() + 1e-3) for f in fs], coords, [1 / T] * T)
    _close(got, ref.reshape(got.shape), tol=1e-4)
    _close(ref.reshape(got.shape), ref_sum, tol=1e-10)


# ---- inputs -----------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_user_errors():
    base, experts, fishers = _states(15)
    with pytest.raises(UserError, match="Fisher diagonal"):
        EpiMerMerger().merge_all(base, experts)
    with pytest.raises(UserError, match="one per expert"):
        FisherMerger().merge_all(base, experts, fishers=fishers[:2])
    bad = dict(experts[0])
    bad["w"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match="shape"):
        TSVMerger().merge_all(base, [bad] + experts[1:])
    with pytest.raises(UserError, match="at least one expert"):
        IsoCMerger().merge_all(base, [])
    neg = [{k: -v for k, v in f.items()} for f in fishers]
    with pytest.raises(UserError, match="non-negative"):
        FisherMerger().merge_all(base, experts, fishers=neg)


@pytest.mark.parametrize("cls, values", [
    (IsoCMerger, {"alpha": "1.3"}),
    (IsoCTSMerger, {"common_space_fraction": "0.5"}),
    (TSVMerger, {"k": "8", "alpha": "0.7"}),
    (FisherMerger, {"normalize": "false"}),
    (DareMerger, {"drop_rate": "0.9", "combine": "ties", "seed": "2"}),
    (EpiMerMerger, {"k": "16", "aggregator": "frechet_mean", "eps_scale": "absolute"}),
])
def test_hyperparameters_are_declared_and_checked(cls, values):
    merger = cls.build(values)
    assert set(values) <= set(merger.config())
    assert merger.protocols == ("multitask",)
    with pytest.raises(UserError):
        cls.build({"no_such_setting": 1})


def test_out_of_range_settings_are_user_errors():
    for cls, values in ((TSVMerger, {"k": 0}), (DareMerger, {"drop_rate": 1.0}), (EpiMerMerger, {"eps": 0.0}),
                        (IsoCTSMerger, {"common_space_fraction": 2.0}), (FisherMerger, {"minimal_fisher_weight": 0})):
        with pytest.raises(UserError):
            cls.build(values)
