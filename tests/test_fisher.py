"""The empirical Fisher diagonal (vmap over chunks) against a plain per-sample backward loop."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from cl_merge.errors import UserError
from cl_merge.fisher import FisherSettings, empirical_fisher, fisher_diagonal, subsample


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=g)
    y = torch.randint(0, 3, (11,), generator=g)
    return model, x, y


def _loop_oracle(model, x, y):
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad ** 2
    return {n: v / len(x) for n, v in acc.items()}


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_vmap_fisher_matches_per_sample_loop(chunk):
    model, x, y = _tiny()

    def loss(params, xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)), yi.reshape(1))

    params = {n: p.detach() for n, p in model.named_parameters()}
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # uneven batches (4 + 7), chunks cut inside them
    est = empirical_fisher(loss, params, batches, chunk_size=chunk)
    assert all(p.grad is None for p in model.parameters())  # the module was called functionally
    ref = _loop_oracle(model, x, y)
    assert est.samples == 11
    for n in ref:
        assert torch.allclose(est.diagonal[n], ref[n], rtol=1e-5, atol=1e-9)


def test_fisher_is_taken_at_the_given_parameters():
    model, x, y = _tiny()

    def loss(params, xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)), yi.reshape(1))

    shifted = {n: p.detach() + 0.5 for n, p in model.named_parameters()}
    est = empirical_fisher(loss, shifted, [(x, y)])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(0.5)
    ref = _loop_oracle(model, x, y)
    for n in ref:
        assert torch.allclose(est.diagonal[n], ref[n], rtol=1e-5, atol=1e-9)


def test_subsample_size_and_determinism():
    assert len(subsample(1000, 0.005, 1, 0)) == 5
    assert len(subsample(1000, 0.005, 64, 0)) == 64
    assert len(subsample(30, 0.005, 64, 0)) == 30
    a = subsample(500, 0.1, 1, seed=3)
    assert a == subsample(500, 0.1, 1, seed=3) and a != subsample(500, 0.1, 1, seed=4)
    assert len(set(a)) == len(a) == 50
    with pytest.raises(ValueError):
        FisherSettings(fraction=1.5)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from cl_merge.registry import BENCHMARKS

    bench = BENCHMARKS.get("mini")(n_train=16, n_val=8, n_test=8)
    adapter = bench.build_model(tmp_path_factory.mktemp("heads"), "cpu", 16)
    return adapter, [bench.build_task(n) for n in bench.task_names(1)[:2]]


def test_clip_adapter_per_sample_loss_gives_the_loop_fisher(mini):
    adapter, tasks = mini
    task = tasks[0]
    base_state = adapter.get_state()
    g = torch.Generator().manual_seed(0)
    expert = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in adapter.get_state().items()}
    settings = FisherSettings(fraction=0.0, min_samples=5, chunk_size=2, batch_size=4, seed=1)
    est = fisher_diagonal(adapter, task, expert, settings)
    assert est.samples == 5
    # oracle: the adapter's own batch loss on batches of one sample, at the expert's weights
    adapter.set_state(expert)
    params = adapter.trainable_parameters()
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in subsample(len(task.train), 0.0, 5, 1):
        image, label = task.train[i]
        for p in params.values():
            p.grad = None
        adapter.loss((image.unsqueeze(0), label.reshape(1)), task).backward()
        for n, p in params.items():
            ref[n] += p.grad ** 2
    adapter.set_state(base_state)
    for n in ref:  # relative to the tensor's norm: the key bias's true gradient is 0 (rounding only)
        assert float((est.diagonal[n] - ref[n] / 5).norm()) <= 1e-5 * float((ref[n] / 5).norm()) + 1e-12, n


def test_every_multitask_merger_runs_on_the_mini_tower_with_adapter_fishers(mini):
    """The real tower's tensor kinds (stacked q/k/v, 4-D conv1, 2-D positional embedding, proj) and
    Fisher diagonals from the adapter: every merger gives finite weights of the right shapes."""
    from cl_merge.strategies.dare import DareMerger
    from cl_merge.strategies.epimer import EpiMerMerger
    from cl_merge.strategies.fisher_merge import FisherMerger
    from cl_merge.strategies.iso_merge import IsoCMerger, IsoCTSMerger
    from cl_merge.strategies.tsv_merge import TSVMerger

    adapter, tasks = mini
    base = adapter.get_state()
    g = torch.Generator().manual_seed(1)
    experts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in tasks]
    settings = FisherSettings(fraction=0.0, min_samples=4, chunk_size=4)
    fishers = [fisher_diagonal(adapter, t, e, settings).diagonal for t, e in zip(tasks, experts)]
    assert adapter.get_state().keys() == base.keys()
    assert all(torch.equal(adapter.get_state()[k], base[k]) for k in base)  # Fisher left the model alone
    for merger in (IsoCMerger(), IsoCTSMerger(), TSVMerger(), FisherMerger(), DareMerger(),
                   DareMerger(combine="ties"), EpiMerMerger(), EpiMerMerger(nonmatrix="fisher")):
        out = merger.merge_all(base, experts, fishers=fishers)
        assert out.keys() == base.keys()
        for k in base:
            assert out[k].shape == base[k].shape and out[k].dtype == base[k].dtype
            assert bool(torch.isfinite(out[k]).all()), (merger.name, k)


def test_adapter_without_per_sample_loss_is_a_user_error():
    class NoLoss:
        device = torch.device("cpu")

        def per_sample_loss(self, task):
            raise NotImplementedError

    with pytest.raises(UserError, match="per-sample loss"):
        fisher_diagonal(NoLoss(), task=None)
