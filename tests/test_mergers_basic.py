"""Identity, task arithmetic and SWA against their defining formulas on random weights."""

import torch
from _merging import random_state, run_merger

from cl_merge.params import nbytes
from cl_merge.registry import MERGERS


def test_task_arithmetic_running_sum_equals_formula():
    base = random_state(0)
    experts = [random_state(i) for i in range(1, 5)]
    alpha = 0.3
    history = run_merger(MERGERS.get("task_arithmetic")(alpha=alpha), base, experts, [base] * 4)
    for t in range(1, 5):
        for k in base:
            expected = base[k] + alpha * sum(experts[s][k] - base[k] for s in range(t))
            assert torch.allclose(history[t - 1][k], expected, atol=1e-5)


def test_task_arithmetic_uses_start_not_base_for_task_vectors():
    base, start, expert = random_state(0), random_state(1), random_state(2)
    out = run_merger(MERGERS.get("task_arithmetic")(alpha=1.0), base, [expert], [start])[0]
    for k in base:
        assert torch.allclose(out[k], base[k] + expert[k] - start[k], atol=1e-6)


def test_swa_is_the_running_mean_of_experts():
    base = random_state(0)
    experts = [random_state(i) for i in range(1, 5)]
    history = run_merger(MERGERS.get("swa")(), base, experts, [base] * 4)
    for t in range(1, 5):
        for k in base:
            expected = torch.stack([experts[s][k] for s in range(t)]).mean(0)
            assert torch.allclose(history[t - 1][k], expected, atol=1e-5)


def test_identity_deploys_the_expert():
    base, expert = random_state(0), random_state(1)
    out = run_merger(MERGERS.get("identity")(), base, [expert], [base])[0]
    assert all(torch.equal(out[k], expert[k]) for k in base)


def test_merger_state_does_not_grow_with_tasks():
    base = random_state(0)
    for name in ("task_arithmetic", "swa", "identity"):
        merger = MERGERS.get(name)()
        merger.reset(base)
        deployed, sizes = base, []
        for t in range(1, 11):
            deployed = merger.merge(base=base, previous=deployed, expert=random_state(t), start=base, step=t)
            sizes.append(nbytes([merger.state_dict()]))
        assert sizes[1] == sizes[-1], name


def test_merger_state_round_trips_through_a_checkpoint():
    base = random_state(0)
    a, b = MERGERS.get("task_arithmetic")(), MERGERS.get("task_arithmetic")()
    a.reset(base)
    a.merge(base=base, previous=base, expert=random_state(1), start=base, step=1)
    b.reset(base)
    b.load_state_dict(a.state_dict())
    out_a = a.merge(base=base, previous=base, expert=random_state(2), start=base, step=2)
    out_b = b.merge(base=base, previous=base, expert=random_state(2), start=base, step=2)
    assert all(torch.equal(out_a[k], out_b[k]) for k in base)
