"""OPCM against a float64 numpy oracle that uses the full SVD (full_matrices=True) of M_{t−1}, zeroes P's
diagonal and top-left r×r block literally, and recomputes the norm mean from the list of all task
vectors at every step."""

import json

import numpy as np
import pytest
import torch
import _merging
from _merging import run_merger as run

import cl_merge  # noqa: F401  (torchvision shim before open_clip)
from cl_merge.params import nbytes
from cl_merge.registry import MERGERS

SHAPES = (("tall", (7, 4)), ("wide", (3, 8)), ("square", (5, 5)), ("b", (6,)), ("conv", (3, 2, 2, 2)))


def random_state(seed, shapes=SHAPES):
    return _merging.random_state(seed, shapes)


def np_state(state):
    return {k: v.double().numpy() for k, v in state.items()}


def oracle_projection(m, tau, alpha):
    u, s, vt = np.linalg.svd(m, full_matrices=True)
    cum = np.cumsum(s) / s.sum()
    r = int(np.nonzero(cum > alpha)[0][0])
    p = u.T @ tau @ vt.T
    np.fill_diagonal(p, 0.0)
    p[:r, :r] = 0.0
    return u @ p @ vt, r


def oracle(base, experts, starts, alpha=0.5):
    """Returns the deployed models (numpy) and the rank splits used at each step."""
    base = np_state(base)
    taus, deployed, lam, splits = [], [], 1.0, []
    for t, (e, s) in enumerate(zip(experts, starts), start=1):
        e, s = np_state(e), np_state(s)
        taus.append({k: e[k] - s[k] for k in base})
        if t == 1:
            deployed.append(e)
            continue
        prev = {k: deployed[-1][k] - base[k] for k in base}
        merged = {}
        for k in base:
            if prev[k].ndim == 2:
                tilde, r = oracle_projection(prev[k], taus[-1][k], alpha)
                splits.append(r)
            else:
                tilde = taus[-1][k]
            merged[k] = lam * prev[k] + tilde
        norm = lambda d: np.sqrt(sum((v ** 2).sum() for v in d.values()))  # noqa: E731
        lam = norm(merged) / np.mean([norm(x) for x in taus])
        deployed.append({k: base[k] + merged[k] / lam for k in base})
    return deployed, splits




@pytest.mark.parametrize("alpha", [0.5, 0.8])
@pytest.mark.parametrize("sequential_starts", [False, True])
def test_opcm_equals_the_full_svd_formula(sequential_starts, alpha):
    base = random_state(0)
    experts = [random_state(i) for i in range(1, 5)]
    starts = [random_state(10 + i) for i in range(4)] if sequential_starts else [base] * 4
    got = run(MERGERS.get("opcm")(alpha=alpha), base, experts, starts)
    expected, splits = oracle(base, experts, starts, alpha)
    assert any(r >= 1 for r in splits)  # the r×r block is exercised, not only the diagonal
    for g, e in zip(got, expected):
        for k in base:
            np.testing.assert_allclose(g[k].numpy(), e[k], atol=1e-5, rtol=0)


def test_first_step_deploys_the_expert_and_lambda_rescales_to_the_mean_norm():
    base = random_state(0)
    experts = [random_state(i) for i in range(1, 4)]
    merger = MERGERS.get("opcm")()
    got = run(merger, base, experts, [base] * 3)
    assert all(torch.equal(got[0][k], experts[0][k]) for k in base)
    # the deployed task vector's norm is the mean task-vector norm (that is what λ_t normalises to)
    norms = [np.sqrt(sum(((e[k] - base[k]).double() ** 2).sum().item() for k in base)) for e in experts]
    deployed_norm = np.sqrt(sum(((got[2][k] - base[k]).double() ** 2).sum().item() for k in base))
    assert deployed_norm == pytest.approx(np.mean(norms), rel=1e-5)
    assert float(merger.state_dict()["count"]) == 3


# distinct singular values (a degenerate pair has no unique basis, so its diagonal is not defined)
@pytest.mark.parametrize("spectrum, expected_r", [([4.9, 3.1, 1.2, 0.8], 1),  # cum 0.49, 0.80
                                                    ([6.0, 2.0, 1.2, 0.8], 0),  # σ_1 alone crosses
                                                    ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], 2),
                                                    ([1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5], 3)])
def test_rank_split_and_projection_on_a_known_spectrum(spectrum, expected_r):
    from cl_merge.strategies.opcm import project_task_vector, split_rank

    g = torch.Generator().manual_seed(0)
    k = len(spectrum)
    u, _ = torch.linalg.qr(torch.randn(9, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    m = (u * torch.tensor(spectrum, dtype=torch.float64)) @ v.T
    s = torch.linalg.svdvals(m.float())
    assert split_rank(s, 0.5) == expected_r
    tau = torch.randn(m.shape, generator=g, dtype=torch.float64)
    expected, r = oracle_projection(m.numpy(), tau.numpy(), 0.5)
    assert r == expected_r
    got = project_task_vector(m.float(), tau.float(), 0.5)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-5)
    # the block and the diagonal are gone in M's singular basis
    p = u.T @ got.double() @ v
    if r:
        assert p[:r, :r].abs().max() < 1e-5
    assert p.diagonal().abs().max() < 1e-5


def test_zero_previous_delta_leaves_the_task_vector_unprojected():
    from cl_merge.strategies.opcm import project_task_vector

    tau = torch.randn(4, 3)
    assert torch.equal(project_task_vector(torch.zeros(4, 3), tau, 0.5), tau)


def _tiny_tower(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "opcm-test-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    visual = open_clip.create_model("opcm-test-vit", pretrained=None).visual
    return {k: p.detach().clone() for k, p in visual.named_parameters()}


@pytest.mark.parametrize("qkv", ["split", "stacked"])
def test_rule_table_on_an_open_clip_visual_tower(tmp_path, qkv):
    """Linear weights are projected (q, k, v one by one by default), everything else is summed."""
    base = _tiny_tower(tmp_path)
    shapes = tuple((k, tuple(v.shape)) for k, v in base.items())
    e1, e2 = random_state(1, shapes), random_state(2, shapes)
    e1 = {k: base[k] + 0.1 * v for k, v in e1.items()}
    e2 = {k: base[k] + 0.1 * v for k, v in e2.items()}
    merger = MERGERS.get("opcm")(qkv=qkv)
    d1 = run(merger, base, [e1], [base])[0]
    lam1 = float(merger.state_dict()["lambda"])
    d2 = merger.merge(base=base, previous=d1, expert=e2, start=base, step=2)
    lam2 = float(merger.state_dict()["lambda"])
    projected = set()
    for k in base:
        m1 = (d1[k] - base[k]).double()
        tilde = lam2 * (d2[k] - base[k]).double() - lam1 * m1  # τ̃ recovered from the output
        tau = (e2[k] - base[k]).double()
        pairs = [(m1, tilde)]
        if k.endswith("in_proj_weight") and qkv == "split":
            pairs = list(zip(m1.chunk(3), tilde.chunk(3)))
        if base[k].ndim == 2 and k != "positional_embedding":
            for m, tt in pairs:
                u, _, vh = torch.linalg.svd(m, full_matrices=False)
                assert (u.T @ tt @ vh.T).diagonal().abs().max() < 1e-4, k
            assert not torch.allclose(tilde, tau, atol=1e-4), k
            projected.add(k.split(".")[-2] if k.endswith(".weight") else k.split(".")[-1])
        else:
            assert torch.allclose(tilde, tau, atol=1e-5), k  # conv1, embeddings, biases, norms: summed
    assert projected == {"proj", "in_proj_weight", "out_proj", "c_fc", "c_proj"}
    if qkv == "stacked":  # one projection of the 3d × d matrix: q's block is not projected on its own
        k = next(n for n in base if n.endswith("in_proj_weight"))
        m1 = (d1[k] - base[k]).double()
        tilde = lam2 * (d2[k] - base[k]).double() - lam1 * m1
        u, _, vh = torch.linalg.svd(m1[:32], full_matrices=False)
        assert (u.T @ tilde[:32] @ vh.T).diagonal().abs().max() > 1e-3


def test_state_is_three_scalars_and_round_trips():
    base = random_state(0)
    m = MERGERS.get("opcm")()
    m.reset(base)
    deployed, sizes = base, []
    for t in range(1, 11):
        deployed = m.merge(base=base, previous=deployed, expert=random_state(t), start=base, step=t)
        sizes.append(nbytes([m.state_dict()]))
    assert sizes[1] == sizes[-1] and set(m.state_dict()) == {"lambda", "norm_sum", "count"}
    other = MERGERS.get("opcm")()
    other.reset(base)
    other.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    a = m.merge(base=base, previous=deployed, expert=random_state(11), start=base, step=11)
    b = other.merge(base=base, previous=deployed, expert=random_state(11), start=base, step=11)
    assert all(torch.equal(a[k], b[k]) for k in base)


def literal_projection_f64(m, tau, alpha):
    """τ̃ straight from the definition in float64: full SVD, P = Uᵀ τ V, zero P's diagonal and top-left r×r
    block, τ̃ = U P Vᵀ (r: first 0-based index where the cumulative singular-value share exceeds α)."""
    m, tau = m.double(), tau.double()
    u, s, vh = torch.linalg.svd(m, full_matrices=True)
    r = int(torch.nonzero(s.cumsum(0) / s.sum() > alpha)[0, 0])
    p = u.T @ tau @ vh.T
    p.diagonal().zero_()
    p[:r, :r] = 0.0
    return u @ p @ vh, r


def _orthonormal(rows, cols, g):
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def _decaying(shape, g, decades=5.0):
    """A float32 matrix with singular values 10^-linspace(0, decades) (ill-conditioned, κ = 10^decades)."""
    k = min(shape)
    s = 10.0 ** -torch.linspace(0, decades, k, dtype=torch.float64)
    return ((_orthonormal(shape[0], k, g) * s) @ _orthonormal(shape[1], k, g).T).float()


def _close_pair(shape, g, gap=1e-6):
    """Well-conditioned (κ = 2) but with two singular values 1e-6 apart: their singular vectors are only
    resolved by a float64 eigendecomposition (a float32 eigh rotates them by ~ε32/gap)."""
    k = min(shape)
    s = torch.linspace(1.0, 0.5, k, dtype=torch.float64)
    s[k // 2 + 1] = s[k // 2] - gap
    return ((_orthonormal(shape[0], k, g) * s) @ _orthonormal(shape[1], k, g).T).float()


# working precision of the products the conditioning rule must pick: ε32·κ² ≤ 1e-5 only for the
# well-conditioned rectangular ones
@pytest.mark.parametrize("kind, shape, work", [("random", (60, 20), torch.float32),
                                               ("random", (16, 48), torch.float32),
                                               ("close pair", (60, 20), torch.float32),
                                               ("random", (24, 24), torch.float64),
                                               ("decaying", (40, 20), torch.float64),
                                               ("decaying", (20, 36), torch.float64),
                                               ("decaying", (24, 24), torch.float64)])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_projection_equals_a_literal_float64_full_svd(kind, shape, work, alpha):
    from cl_merge.strategies.opcm import gram_eigh, project_task_vector

    g = torch.Generator().manual_seed(sum(shape))
    m = {"random": lambda: torch.randn(shape, generator=g), "decaying": lambda: _decaying(shape, g),
         "close pair": lambda: _close_pair(shape, g)}[kind]()
    tau = torch.randn(shape, generator=g)
    expected, r = literal_projection_f64(m, tau, alpha)
    got = project_task_vector(m, tau, alpha)
    assert got.dtype == torch.float32 and got.shape == tau.shape
    assert float((got.double() - expected).norm() / expected.norm()) <= 1e-5
    assert gram_eigh(m if shape[0] >= shape[1] else m.T)[0].dtype == work
    if alpha == 0.8:
        assert r >= 1  # the r×r block is exercised, not only the diagonal


@pytest.mark.parametrize("shape, rank", [((12, 8), 5), ((6, 10), 3)])
def test_null_directions_of_a_rank_deficient_matrix_are_left_alone(shape, rank):
    """σ_i ≤ 10·ε32·σ_max: no diagonal entry is zeroed along them (a literal SVD would zero u_iᵀ τ v_i for
    whatever null basis LAPACK returns); τ̃ is the formula on the rank non-null components only."""
    from cl_merge.strategies.opcm import project_task_vector

    g = torch.Generator().manual_seed(3)
    a = torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
    m = (a @ torch.randn(rank, shape[1], generator=g, dtype=torch.float64)).float()
    tau = torch.randn(shape, generator=g)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=True)
    assert s[rank - 1] > 1e-3 * s[0] and (s[rank:] <= 1e-6 * s[0]).all()
    got = project_task_vector(m, tau, 0.5).double()
    # expected: τ − U_k Q V_kᵀ over the k = rank non-null components (module doc), same r as the literal
    literal, r = literal_projection_f64(m, tau, 0.5)
    uk, vk = u[:, :rank], vh[:rank].T
    q = uk.T @ tau.double() @ vk
    keep = torch.zeros_like(q)
    keep[:r, :r] = 1.0
    keep.diagonal().fill_(1.0)
    expected = tau.double() - uk @ (q * keep) @ vk.T
    assert float((got - expected).norm() / expected.norm()) <= 1e-5
    # τ̃ − τ lies in M's column and row spaces: nothing moves along the null directions
    diff = got - tau.double()
    assert float((u[:, rank:].T @ diff).norm()) <= 1e-5 * float(diff.norm())
    assert float((diff @ vh[rank:].T).norm()) <= 1e-5 * float(diff.norm())
    # the literal full-SVD result differs there: it also zeroes P's diagonal on the arbitrary null basis
    assert float((literal - expected).norm() / expected.norm()) > 1e-3
