"""MagMax-IND against an oracle that stacks every task vector seen so far and picks per entry the one
of largest magnitude (the later task on ties)."""

import numpy as np
import pytest
import torch
from _merging import random_state
from _merging import run_merger as run

from cl_merge.params import nbytes
from cl_merge.registry import MERGERS

SHAPES = (("w", (6, 4)), ("b", (6,)), ("conv", (3, 2, 2, 2)))






def oracle(base, experts, starts, t, key, lam=0.5):
    taus = np.stack([(experts[s][key] - starts[s][key]).numpy() for s in range(t)])
    mags = np.abs(taus)
    # last index achieving the maximum = ties go to the later task
    last = t - 1 - np.argmax(mags[::-1] == mags.max(0), axis=0)
    chosen = np.take_along_axis(taus, last[None], 0)[0]
    return base[key].numpy() + lam * chosen


@pytest.mark.parametrize("sequential_starts", [False, True])
def test_magmax_equals_theta0_plus_lambda_max_magnitude_vector(sequential_starts):
    base = random_state(0)
    experts = [random_state(i) for i in range(1, 5)]
    starts = [random_state(10 + i) for i in range(4)] if sequential_starts else [base] * 4
    got = run(MERGERS.get("magmax")(), base, experts, starts)
    for t in range(1, 5):
        for k in base:
            np.testing.assert_allclose(got[t - 1][k].numpy(), oracle(base, experts, starts, t, k),
                                       atol=1e-6, rtol=0)


def test_equal_magnitudes_go_to_the_later_task():
    base = {k: torch.zeros(s) for k, s in SHAPES}
    e1 = random_state(1)
    e2 = {k: -v for k, v in e1.items()}  # same magnitudes, opposite signs everywhere
    got = run(MERGERS.get("magmax")(alpha=1.0), base, [e1, e2], [base, base])
    for k in base:
        assert torch.equal(got[1][k], e2[k])
        np.testing.assert_array_equal(got[1][k].numpy(), oracle(base, [e1, e2], [base, base], 2, k, 1.0))


def test_state_is_constant_and_round_trips():
    base = random_state(0)
    m = MERGERS.get("magmax")()
    m.reset(base)
    deployed, sizes = base, []
    for t in range(1, 11):
        deployed = m.merge(base=base, previous=deployed, expert=random_state(t), start=base, step=t)
        sizes.append(nbytes([m.state_dict()]))
    assert sizes[1] == sizes[-1]
    other = MERGERS.get("magmax")()
    other.reset(base)
    other.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    a = m.merge(base=base, previous=deployed, expert=random_state(11), start=base, step=11)
    b = other.merge(base=base, previous=deployed, expert=random_state(11), start=base, step=11)
    assert all(torch.equal(a[k], b[k]) for k in base)
