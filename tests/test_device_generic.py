"""Device-generic kernels: every merge and selection kernel creates its tensors on its inputs' device.

No GPU is needed: the kernels run on CPU inputs while the *default* device is ``meta``. A tensor a
kernel created without ``device=`` (``torch.zeros(n)``, ``torch.full(...)``) lands on ``meta`` and the
first op mixing it with the CPU inputs raises, which is exactly the bug that would break it on CUDA.
The results must equal the plain CPU run bit for bit, and stay on the inputs' device."""

import pytest
import torch

from cl_merge.spectral import polar, truncated_svd
from cl_merge.strategies.dare import dare_drop
from cl_merge.strategies.epimer import epimer_matrix
from cl_merge.strategies.iso_merge import iso_c_matrix, iso_cts_matrix
from cl_merge.strategies.isotropic import isotropic_matrix
from cl_merge.strategies.opcm import project_task_vector
from cl_merge.strategies.sa_bcd import SABCD, exact_top_k, top_mask
from cl_merge.strategies.tsv_merge import tsv_matrix


def _finetune_like(m, n, seed, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(m, 8, generator=g), torch.randn(8, n, generator=g)
    return torch.randn(m, n, generator=g) * noise + (left * torch.logspace(0, -2, 8)) @ right / n ** 0.5


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return all(_same(x, y) for x, y in zip(a, b))
    return a.device == b.device == torch.device("cpu") and torch.equal(a, b)


def _under_meta_default(fn):
    with torch.device("meta"):
        return fn()


def _tasks(m, n, count=3):
    return [_finetune_like(m, n, s) for s in range(count)]


# name -> (inputs, built on CPU before the default device changes; the kernel applied to them)
KERNELS = {
    "truncated_svd float32": (lambda: (torch.randn(40, 24, generator=torch.Generator().manual_seed(0)),),
                              lambda a: truncated_svd(a, 5)),
    "truncated_svd refined": (lambda: (_finetune_like(96, 64, 1),), lambda a: truncated_svd(a, 6)),
    "truncated_svd float64": (lambda: (_finetune_like(96, 64, 1).double(),),
                              lambda a: truncated_svd(a, 6, "float64")),
    "polar": (lambda: (_finetune_like(50, 30, 2),), lambda a: polar(a, return_singular=True)),
    "isotropic_matrix float32": (lambda: (torch.randn(60, 20, generator=torch.Generator().manual_seed(3)),),
                                 lambda a: isotropic_matrix(a, t=3)),
    "isotropic_matrix float64 route": (lambda: (_finetune_like(48, 48, 3),), lambda a: isotropic_matrix(a, t=3)),
    "opcm projection": (lambda: (_finetune_like(48, 32, 4), _finetune_like(48, 32, 5)),
                        lambda m, t: project_task_vector(m, t, 0.5)),
    "tsv_m": (lambda: (_tasks(48, 32),), lambda d: tsv_matrix(d, 4)),
    "iso_c": (lambda: (_tasks(48, 32),), iso_c_matrix),
    "iso_cts": (lambda: (_tasks(48, 32),), lambda d: iso_cts_matrix(d, 0.5)),
    "epimer": (lambda: (_tasks(48, 32), [torch.rand(48, 32, generator=torch.Generator().manual_seed(9 + s))
                                         for s in range(3)]),
               lambda d, f: epimer_matrix(d, f, 4)),
    "dare": (lambda: (_finetune_like(20, 10, 6),),
             lambda d: dare_drop(d, 0.5, True, torch.Generator().manual_seed(3))),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_merge_kernel_creates_no_tensor_on_the_default_device(name):
    inputs, kernel = KERNELS[name]
    args = inputs()
    assert all(t.device.type == "cpu" for a in args for t in (a if isinstance(a, list) else [a]))
    assert _same(_under_meta_default(lambda: kernel(*args)), kernel(*args))


def _sabcd_problem(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(30, 20, generator=g, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(30, generator=g, dtype=dtype))
    x = torch.randn(8, 20, generator=g, dtype=dtype)
    return w, b, x


def _sabcd_run(w, b, x):
    opt = SABCD([w, b], lr=1e-2, p=0.25)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = (x @ w.T + b).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    return w.detach().clone(), b.detach().clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fused and unfused update
def test_sa_bcd_step_creates_no_tensor_on_the_default_device(dtype):
    problem = _sabcd_problem(dtype)  # on CPU
    on_meta_default = _under_meta_default(lambda: _sabcd_run(*problem))
    assert _same(on_meta_default, _sabcd_run(*_sabcd_problem(dtype)))


@pytest.mark.parametrize("seed", range(6))
def test_the_device_selection_path_equals_the_cpu_one(seed):
    """exact_top_k (what CUDA runs) against the numpy path and a stable-sort oracle, with ties."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=g))
    score = torch.randint(-4, 5, (n,), generator=g).float() * (0.5 if seed % 2 else 1.0)
    if seed >= 3:
        score = score + torch.randn(n, generator=g) * (seed == 5)
    for k in (1, max(1, n // 3), n):
        oracle = torch.zeros(n, dtype=torch.bool)
        oracle[torch.sort(-score.abs().double(), stable=True).indices[:k]] = True
        assert torch.equal(exact_top_k(score, k), oracle)
        assert torch.equal(top_mask(score, k).bool(), oracle)
    meta = exact_top_k(torch.empty(50, device="meta"), 10)  # runs on a non-CPU device without host syncs
    assert meta.device.type == "meta" and meta.shape == (50,)


def test_tsv_factors_keep_their_owner_index_on_the_inputs_device():
    from cl_merge.strategies.tsv_merge import task_factors

    deltas = _tasks(48, 32)
    f = _under_meta_default(lambda: task_factors(deltas, 4))
    assert {t.device.type for t in f} == {"cpu"}
