"""Empirical Fisher diagonal of an expert: v = E_x[(∇_θ ℓ(x, θ))²] (EpiMer supplement Eq. 27; the
curvature of Fisher-weighted averaging and of EpiMer).

Per-sample gradients come from ``torch.func``: ``vmap(grad(loss))`` over chunks of ``chunk_size``
samples, with the parameters passed functionally (``functional_call``), so peak memory is
O(chunk × parameters) (plus the chunk's activations) instead of O(batch × parameters), and the
model's own parameters are never touched (the Fisher is taken at whatever state is passed). The
squares are summed over the samples in float32 (float64 for float64 parameters) and divided by their
number.

Samples: a subsample of the task's training split — shuffled with ``seed``, the first
max(``min_samples``, ⌈``fraction``·N⌉) (all N if fewer). The supplement shows ≤ 0.5 % of the training
set suffices on its CLIP tasks (it takes whole batches of 64; on a few-hundred-sample split 0.5 % is
one or two samples, hence the floor: 256 = FusionBench's ``num_fisher_examples``).

The adapter supplies the functional per-sample loss (``ModelAdapter.per_sample_loss``): for the CLIP
classifier, the cross-entropy of one image against its label through the frozen zero-shot head —
the training loss, so labels are the data's (an *empirical* Fisher).

Where other Fishers in the project and in the references agree or differ:

* EWC (``strategies/ewc.py``, Avalanche's ``EWCPlugin.compute_importances`` and the native path):
  F = mean over the task's training minibatches of (∇ mean-over-the-batch loss)², on the whole
  split. That is the squared gradient of a batch mean, not the mean of per-sample squares: equal to
  this only with batch size 1 (for batch size B it is ≈ (1/B)·E[g²] + (1 − 1/B)·E[g]², smaller and
  dominated by the mean gradient). EWC keeps Avalanche's definition (the community implementation);
  the two agree in everything else (labels from the data, parameters of the trained tower).
* FusionBench's Fisher merging (from MergeLM): for classifiers, the squared gradient of
  Σ_batch Σ_c √p_c log p_c (the model's predictive distribution, no labels), summed per batch before
  squaring, divided by the number of examples — neither per-sample nor the exact expected Fisher
  Σ_c p_c (∇ log p_c)². Matena & Raffel's paper uses the expected (model) Fisher; the EpiMer
  supplement uses the empirical one, which is what this computes.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence

import torch

from .components import Component
from .errors import UserError
from .params import StateDict

#: (params, *one_sample) -> scalar loss of that sample (no batch dimension on the sample's tensors)
PerSampleLoss = Callable[..., torch.Tensor]


class FisherEstimate(NamedTuple):
    diagonal: StateDict
    samples: int
    seconds: float


def subsample(n: int, fraction: float, min_samples: int, seed: int) -> List[int]:
    """Indices of the Fisher subsample of an n-sample split (module docstring)."""
    count = min(n, max(min_samples, math.ceil(fraction * n)))
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:count].tolist()


def empirical_fisher(loss: PerSampleLoss, params: StateDict, batches: Iterable[Sequence[torch.Tensor]], *,
                     chunk_size: int = 8) -> FisherEstimate:
    """(1/N) Σ_x (∇_params loss(params, x))² over every sample of ``batches`` (tuples of tensors with
    a leading batch dimension), per-sample gradients in chunks of ``chunk_size``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    from torch.func import grad, vmap

    start = time.perf_counter()
    params = {k: v.detach() for k, v in params.items()}
    acc = {k: torch.zeros_like(v, dtype=torch.float64 if v.dtype == torch.float64 else torch.float32)
           for k, v in params.items()}
    per_sample = None
    count = 0
    with warnings.catch_warnings():
        # attention backward has no vmap batching rule on CPU: torch loops over the chunk (correct)
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        for batch in batches:
            batch = tuple(batch)
            if per_sample is None:
                per_sample = vmap(grad(loss), in_dims=(None,) + (0,) * len(batch))
            size = len(batch[0])
            for s in range(0, size, chunk_size):
                grads = per_sample(params, *(x[s:s + chunk_size] for x in batch))
                for k, g in grads.items():
                    acc[k] += g.detach().to(acc[k].dtype).pow(2).sum(0)
            count += size
    if count == 0:
        raise UserError("the Fisher diagonal needs at least one sample; the subsample is empty")
    return FisherEstimate({k: v / count for k, v in acc.items()}, count, time.perf_counter() - start)


@dataclasses.dataclass
class FisherSettings(Component):
    """How an expert's Fisher diagonal is estimated (``fisher_diagonal``)."""

    name = "fisher"
    description = "empirical Fisher diagonal: per-sample squared gradients on a training subsample"
    fraction: float = 0.005  # of the training split
    min_samples: int = 256
    chunk_size: int = 8  # samples per vmap call: memory O(chunk × parameters)
    batch_size: int = 64  # samples per loaded batch
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1]; got {self.fraction}")
        for key in ("min_samples", "chunk_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1; got {getattr(self, key)}")


def fisher_diagonal(adapter, task, params: Optional[StateDict] = None,
                    settings: Optional[FisherSettings] = None) -> FisherEstimate:
    """Empirical Fisher diagonal of ``adapter``'s mergeable parameters on ``task``'s training split,
    at ``params`` (default: the adapter's current state)."""
    from torch.utils.data import DataLoader, Subset

    settings = settings or FisherSettings()
    try:
        loss = adapter.per_sample_loss(task)
    except NotImplementedError:
        raise UserError(f"{type(adapter).__name__} has no per-sample loss, which the Fisher diagonal needs; "
                        "use a merger that needs no Fisher") from None
    device = adapter.device
    if params is None:
        params = adapter.get_state()
    params = {k: v.detach().to(device) for k, v in params.items()}
    data = task.train
    if len(data) == 0:
        raise UserError(f"task {task.name} has no training split to estimate the Fisher diagonal on; "
                        "choose a merger that needs no Fisher (e.g. c_tsv_m, tsv_m)")
    indices = subsample(len(data), settings.fraction, settings.min_samples, settings.seed)
    # adapters whose samples are not tensors (a causal LM's text records) say how to batch them
    collate = getattr(adapter, "collate_samples", None)
    loader = DataLoader(Subset(data, indices), batch_size=settings.batch_size, shuffle=False, collate_fn=collate)
    batches = (tuple(x.to(device) for x in batch) for batch in loader)
    est = empirical_fisher(loss, params, batches, chunk_size=settings.chunk_size)
    return est._replace(diagonal={k: v.cpu() for k, v in est.diagonal.items()})



def cache_tag(settings: FisherSettings) -> str:
    """Name of an expert's Fisher file in the expert cache: the settings that change the estimate
    (not ``chunk_size`` / ``batch_size``, which only change how it is computed)."""
    import hashlib
    import json

    what = {k: v for k, v in settings.config().items() if k not in ("chunk_size", "batch_size")}
    return "fisher-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def expert_fisher(adapter, task, expert: StateDict, settings: FisherSettings, cache=None,
                  cache_key: Optional[str] = None):
    """(Fisher diagonal of ``expert`` on ``task``, samples, seconds, source): read from beside the
    expert in the expert cache when it is there ("cache"), else estimated ("computed") and stored
    there. ``cache`` is an ``ExpertCache`` (None: nothing is cached)."""
    tag = cache_tag(settings)
    if cache is not None and cache_key is not None:
        cached = cache.get_side(cache_key, tag)
        if cached is not None:
            n = len(task.train)
            return cached, min(n, max(settings.min_samples, math.ceil(settings.fraction * n))), 0.0, "cache"
    est = fisher_diagonal(adapter, task, params=expert, settings=settings)
    if cache is not None and cache_key is not None:
        cache.put_side(cache_key, tag, est.diagonal)
    return est.diagonal, est.samples, est.seconds, "computed"
