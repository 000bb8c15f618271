"""C-TIES (seed paper C.3) and FusionBench's continual TIES against plain-numpy oracles that keep the
list of all task vectors and recompute from scratch at every step."""

import numpy as np
import pytest
import torch
import _merging

from cl_merge.params import nbytes
from cl_merge.registry import MERGERS

SHAPES = (("w", (6, 4)), ("v", (3, 7)), ("b", (6,)), ("conv", (3, 2, 2, 2)))


def random_state(seed, scale=1.0):
    return _merging.random_state(seed, SHAPES, scale)


def flat(state):
    return np.concatenate([state[k].double().numpy().ravel() for k, _ in SHAPES])


def unflat(vec):
    out, i = {}, 0
    for k, s in SHAPES:
        n = int(np.prod(s))
        out[k] = vec[i:i + n].reshape(s)
        i += n
    return out


def np_trim(x, keep):
    """TIES reference trim: threshold = (d − ⌊keep·d⌋)-th smallest |x|, keep |x| ≥ threshold."""
    d = x.size
    n_keep = int(d * keep)
    if n_keep >= d:
        return x.copy()
    thr = np.sort(np.abs(x))[d - n_keep - 1]
    return np.where(np.abs(x) >= thr, x, 0.0)


def np_trim_state(x, keep, scope):
    if scope == "global":
        return np_trim(x, keep)
    parts = unflat(x)
    return np.concatenate([np_trim(parts[k].ravel(), keep) for k, _ in SHAPES])


def run(merger, base, experts, starts):
    return [flat(d) for d in _merging.run_merger(merger, base, experts, starts)]


def scenario(sequential_starts):
    base = random_state(0)
    experts = [random_state(i) for i in range(1, 5)]
    starts = [random_state(10 + i) for i in range(4)] if sequential_starts else [base] * 4
    return base, experts, starts


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("sequential_starts", [False, True])
def test_seed_variant_is_theta0_plus_alpha_sum_of_trimmed_task_vectors(scope, sequential_starts):
    base, experts, starts = scenario(sequential_starts)
    merger = MERGERS.get("ties")(trim_scope=scope)
    assert merger.alpha == 0.3 and merger.k == 0.2  # the defaults documented in ties.py
    got = run(merger, base, experts, starts)
    taus = [flat(e) - flat(s) for e, s in zip(experts, starts)]
    for t in range(1, 5):
        expected = flat(base) + 0.3 * sum(np_trim_state(tau, 0.2, scope) for tau in taus[:t])
        np.testing.assert_allclose(got[t - 1], expected, atol=1e-5, rtol=0)


def test_seed_trim_keeps_the_top_fraction_globally():
    tau = flat(random_state(3))
    kept = np_trim(tau, 0.2)
    d = tau.size
    assert (kept != 0).sum() == int(0.2 * d) + 1  # the reference rule keeps ⌊k·d⌋ + 1 entries
    base = random_state(0)
    expert = {k: base[k] + v for k, v in unflat(tau).items()}
    out = run(MERGERS.get("ties")(alpha=1.0), base, [{k: torch.as_tensor(v, dtype=torch.float32)
                                                       for k, v in expert.items()}], [base])[0]
    delta = out - flat(base)
    assert (np.abs(delta) > 1e-6).sum() == int(0.2 * d) + 1


def np_fusionbench(base, experts, starts, keep=0.2, alpha=0.5):
    """previous + α·TIES([M_{t−1}; τ_t]) with per-row trim, sign election, disjoint sum; t = 1 untrimmed."""
    prev, out, elections = flat(base), [], 0
    for t, (e, s) in enumerate(zip(experts, starts), start=1):
        tau = flat(e) - flat(s)
        if t == 1:
            prev = prev + alpha * tau
        else:
            rows = np.stack([np_trim(prev - flat(base), keep), np_trim(tau, keep)])
            sign = np.sign(rows.sum(0))
            sign[sign == 0] = np.sign(sign.sum())
            agree = np.where(sign > 0, rows > 0, rows < 0)
            elections += int(((rows != 0) & ~agree).sum())
            prev = prev + alpha * (rows * agree).sum(0)
        out.append(prev.copy())
    return out, elections


@pytest.mark.parametrize("keep", [0.2, 0.5])
@pytest.mark.parametrize("sequential_starts", [False, True])
def test_fusionbench_variant_matches_the_peer_formula(sequential_starts, keep):
    base, experts, starts = scenario(sequential_starts)
    merger = MERGERS.get("ties")(variant="fusionbench", k=keep)
    assert merger.alpha == 0.5
    got = run(merger, base, experts, starts)
    expected, dropped_by_election = np_fusionbench(base, experts, starts, keep=keep)
    if keep == 0.5:
        assert dropped_by_election > 0  # the scenario exercises the sign election
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


def test_fusionbench_zero_sum_entries_take_the_majority_sign():
    # M_1 = 0.5·τ_1 and τ_2 = −M_1 on the first entries: their sums are exactly 0
    base = {k: torch.zeros(s) for k, s in SHAPES}
    e1 = {k: torch.full(s, 2.0) for k, s in SHAPES}
    e1["w"][0, 0] = 8.0  # survives both trims
    e2 = {k: torch.full(s, -0.1) for k, s in SHAPES}
    e2["w"][0, 0] = -4.0  # = −M_1 there
    e2["w"][1] = 3.0  # large positive entries dominate the majority sign
    got = run(MERGERS.get("ties")(variant="fusionbench"), base, [e1, e2], [base, base])
    expected, _ = np_fusionbench(base, [e1, e2], [base, base])
    np.testing.assert_allclose(got[1], expected[1], atol=1e-6, rtol=0)
    # majority sign is +: the positive M_1 entry is kept, the negative τ_2 one dropped
    assert got[1][0] == pytest.approx(4.0 + 0.5 * 4.0)


@pytest.mark.parametrize("concat_limit", [0, 1 << 22], ids=["histogram", "concatenated"])
def test_global_threshold_equals_the_sorted_one(monkeypatch, concat_limit):
    from cl_merge import reductions
    from cl_merge.reductions import kth_smallest_abs

    monkeypatch.setattr(reductions, "CONCAT_LIMIT", concat_limit)
    tensors = [torch.randn(5, 3), torch.tensor([0.0, -0.0, 2.5, -2.5, 1e-30]), torch.randn(7)]
    values = np.sort(np.abs(np.concatenate([t.numpy().ravel() for t in tensors])))
    for k in (1, 2, 3, 9, len(values) - 1, len(values)):
        assert float(kth_smallest_abs(tensors, k)) == values[k - 1]


@pytest.mark.parametrize("variant", ["seed", "fusionbench"])
def test_state_is_constant_in_the_number_of_tasks(variant):
    base = random_state(0)
    merger = MERGERS.get("ties")(variant=variant)
    merger.reset(base)
    deployed, sizes = base, []
    for t in range(1, 11):
        deployed = merger.merge(base=base, previous=deployed, expert=random_state(t), start=base, step=t)
        sizes.append(nbytes([merger.state_dict()]))
    assert sizes[1] == sizes[-1]


@pytest.mark.parametrize("variant", ["seed", "fusionbench"])
def test_state_round_trips_through_a_checkpoint(variant):
    base = random_state(0)
    a = MERGERS.get("ties")(variant=variant)
    a.reset(base)
    d1 = a.merge(base=base, previous=base, expert=random_state(1), start=base, step=1)
    d2 = a.merge(base=base, previous=d1, expert=random_state(2), start=base, step=2)
    b = MERGERS.get("ties")(variant=variant)
    b.reset(base)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    out_a = a.merge(base=base, previous=d2, expert=random_state(3), start=base, step=3)
    out_b = b.merge(base=base, previous=d2, expert=random_state(3), start=base, step=3)
    assert all(torch.equal(out_a[k], out_b[k]) for k in base)


def test_k_must_be_a_fraction():
    from cl_merge.errors import UserError

    with pytest.raises(UserError):
        MERGERS.get("ties").build({"k": "20"})


def test_tensor_scope_with_split_qkv_trims_q_k_v_on_their_own():
    g = torch.Generator().manual_seed(4)
    base = {"attn.in_proj_weight": torch.zeros(6, 2), "attn.in_proj_bias": torch.zeros(6)}
    tau = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    got = _merging.run_merger(MERGERS.get("ties")(trim_scope="tensor", qkv="split", alpha=1.0), base, [tau], [base])[0]
    w = tau["attn.in_proj_weight"].numpy()
    blocks = [np_trim(w[i:i + 2].reshape(-1), 0.2).reshape(2, 2) for i in (0, 2, 4)]
    np.testing.assert_allclose(got["attn.in_proj_weight"].numpy(), np.concatenate(blocks), atol=0)
    np.testing.assert_allclose(got["attn.in_proj_bias"].numpy(), np_trim(tau["attn.in_proj_bias"].numpy(), 0.2), atol=0)
    stacked = _merging.run_merger(MERGERS.get("ties")(trim_scope="tensor", alpha=1.0), base, [tau], [base])[0]
    np.testing.assert_allclose(stacked["attn.in_proj_weight"].numpy(), np_trim(w.reshape(-1), 0.2).reshape(6, 2), atol=0)
