"""Layer-by-layer merging: every registered merger, one tensor at a time, from files to a file.

``stream_merge`` computes exactly what ``merger.merge(base, previous, expert, start, step)`` computes
(the tests compare the two on a tiny model), but reads θ0, the previous deployed model and the expert
lazily from safetensors (``TensorSource``) and writes the new deployed model tensor by tensor
(``TensorWriter``). So a merge step holds a few tensors of one layer, never a model, and the merger's
O(model) state (C-TA's running sum, MagMax's running max, C-TIES' trimmed sum) lives in a state file
that is streamed the same way.

How each merger is streamed:

* **tensor-wise mergers** (task_arithmetic, magmax, swa, identity, isotropic; a third-party merger
  opts in with the class attribute ``streaming = "tensorwise"``): their rule for one tensor depends on
  that tensor only, so the merger's own ``merge`` runs on one-tensor dicts. Its per-tensor state goes
  through its own ``state_dict``/``load_state_dict`` (``reset`` is called with the one-tensor θ0 first),
  stored under ``"<tensor>::<state key>"``.
* **ties**: the trim threshold of the ``global`` scope ranks all entries of a task vector together; it
  is found exactly in two histogram passes (``streamed_kth_smallest_abs``), then the per-tensor rule
  runs. The FusionBench variant adds one pass for the all-parameter majority sign.
* **opcm**: λ_t needs ‖S_t‖ over all parameters before any deployed tensor can be written, so S_t is
  spooled to a scratch file in pass 1 and deployed = θ0 + S_t/λ_t is written in pass 2. Its three
  scalars are the state.

Anything else raises a UserError naming the merger (an all-parameter rule needs its own pass plan here).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from .errors import UserError
from .merger import Merger
from .streaming import LiveTensors, TensorSource, TensorWriter, streamed_kth_smallest_abs

TENSORWISE = {"task_arithmetic", "magmax", "swa", "identity", "isotropic"}


class MergeStep:
    """The inputs and outputs of one streamed merge step."""

    def __init__(self, names: List[str], base: Mapping, previous: Mapping, expert: Mapping, start: Mapping,
                 step: int, out_path: Path, state_in: Optional[Path], state_out: Path,
                 store_dtype: torch.dtype = torch.float32, device: str = "cpu",
                 tracker: Optional[LiveTensors] = None):
        self.names = names
        self.base, self.previous, self.expert, self.start = base, previous, expert, start
        self.step = step
        self.out_path = Path(out_path)
        self.state_out = Path(state_out)
        self.store_dtype = store_dtype
        self.device = device
        self.tracker = tracker
        self._layout = None
        self.state = TensorSource(state_in, dtype=None, device=device, tracker=tracker) if state_in else None
        self._state_index: Dict[str, List[str]] = {}
        if self.state is not None:
            for key in self.state:
                name, sep, _ = key.partition("::")
                if sep:
                    self._state_index.setdefault(name, []).append(key)

    def layout(self):
        """{name: (store dtype, shape)} of the deployed file (shapes read from headers, not data)."""
        if self._layout is None:
            self._layout = {n: (self.store_dtype, tuple(self.base.spec(n)[1]) if hasattr(self.base, "spec")
                                else tuple(self.base[n].shape)) for n in self.names}
        return self._layout

    def state_of(self, name: str) -> Dict[str, torch.Tensor]:
        """The stored per-tensor state of ``name`` ({state key: tensor})."""
        if self.state is None:
            return {}
        return {key.partition("::")[2]: self.state[key] for key in self._state_index.get(name, [])}

    def scalar_state(self, key: str) -> Optional[torch.Tensor]:
        if self.state is None or f"::{key}" not in self.state:
            return None
        return self.state[f"::{key}"]

    def tau(self, name: str) -> torch.Tensor:
        return torch.sub(self.expert[name], self.start[name])

    def writer(self) -> TensorWriter:
        return TensorWriter(self.out_path, layout=self.layout(), metadata={"step": str(self.step)})


def stream_merge(merger: Merger, step: MergeStep) -> Dict[str, float]:
    """Merge one step from files to ``step.out_path`` (+ ``step.state_out``); returns timings/counters."""
    t0 = time.perf_counter()
    name = getattr(merger, "name", type(merger).__name__)
    if name == "ties":
        passes = _ties(merger, step)
    elif name == "opcm":
        passes = _opcm(merger, step)
    elif name in TENSORWISE or getattr(merger, "streaming", None) == "tensorwise":
        passes = _tensorwise(merger, step)
    else:
        raise UserError(f"merger {name} has no layer-by-layer (streaming) path; the tensor-wise mergers are "
                        f"{', '.join(sorted(TENSORWISE))}, plus ties and opcm (a tensor-wise third-party merger "
                        "declares streaming = \"tensorwise\")")
    return {"merge_s": time.perf_counter() - t0, "passes": passes}


def _store(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype=dtype)


def _tensorwise(merger: Merger, s: MergeStep) -> int:
    with s.writer() as out, TensorWriter(s.state_out) as state_out:
        for n in s.names:
            b = s.base[n]
            one_base = {n: b}
            merger.reset(one_base)
            stored = s.state_of(n)
            if stored:
                merger.load_state_dict(stored)
            start = one_base if s.start is s.base else {n: s.start[n]}
            merged = merger.merge(base=one_base, previous={n: s.previous[n]}, expert={n: s.expert[n]},
                                  start=start, step=s.step)
            out.add(n, _store(merged[n], s.store_dtype))
            for key, value in merger.state_dict().items():
                state_out.add(f"{n}::{key}", value.detach().to("cpu"))
            del b, one_base, start, merged, stored
    return 1


# ---- TIES ---------------------------------------------------------------------------------------------

def _kth_index(d: int, keep: float) -> Optional[int]:
    kth = d - int(d * keep)
    return None if (kth <= 0 or d == 0) else kth


def _tensor_threshold(v: torch.Tensor, keep: float) -> Optional[torch.Tensor]:
    kth = _kth_index(v.numel(), keep)
    return None if kth is None else v.detach().abs().float().reshape(-1).kthvalue(kth).values


def _global_threshold(s: MergeStep, vector, keep: float) -> Optional[torch.Tensor]:
    layout = s.layout()
    d = sum(math.prod(layout[n][1]) for n in s.names)
    kth = _kth_index(d, keep)
    if kth is None:
        return None
    return streamed_kth_smallest_abs(lambda: (vector(n) for n in s.names), kth)


def _trim(v: torch.Tensor, thr: Optional[torch.Tensor]) -> torch.Tensor:
    return v if thr is None else v * (v.abs().float() >= thr.to(v.device))


def _ties(merger, s: MergeStep) -> int:
    keep, scope, alpha = merger.k, merger.trim_scope, merger.alpha
    if scope == "tensor" and getattr(merger, "qkv", "stacked") == "split":
        raise UserError("streamed ties ranks each stored tensor whole; set merger.qkv=stacked or "
                        "merger.trim_scope=global")
    passes = 0
    if merger.variant == "seed":
        thr = _global_threshold(s, s.tau, keep) if scope == "global" else None
        passes += 2 if scope == "global" else 0
        with s.writer() as out, TensorWriter(s.state_out) as state_out:
            for n in s.names:
                tau = s.tau(n)
                trimmed = _trim(tau, thr if scope == "global" else _tensor_threshold(tau, keep))
                stored = s.state_of(n).get(f"sum.{n}")
                total = torch.zeros_like(s.base[n]) if stored is None else stored.clone()
                total += trimmed
                out.add(n, _store(s.base[n] + alpha * total, s.store_dtype))
                state_out.add(f"{n}::sum.{n}", total.to("cpu"))
        return passes + 1

    # FusionBench variant: previous + α·TIES([M_{t−1}, τ_t]); no state
    with TensorWriter(s.state_out):
        pass
    if s.step == 1:
        with s.writer() as out:
            for n in s.names:
                out.add(n, _store(s.previous[n] + alpha * s.tau(n), s.store_dtype))
        return 1

    def m_vec(n):
        return torch.sub(s.previous[n], s.base[n])

    if scope == "global":
        thr_m, thr_t = _global_threshold(s, m_vec, keep), _global_threshold(s, s.tau, keep)
        passes += 4

    def trimmed_rows(n):
        m, t = m_vec(n), s.tau(n)
        if scope == "global":
            return _trim(m, thr_m), _trim(t, thr_t)
        return _trim(m, _tensor_threshold(m, keep)), _trim(t, _tensor_threshold(t, keep))

    vote = torch.zeros((), dtype=torch.float64)
    for n in s.names:  # the all-parameter majority sign
        r_m, r_t = trimmed_rows(n)
        vote += torch.sign(r_m + r_t).sum(dtype=torch.float64).cpu()
    majority = torch.sign(vote)
    passes += 1
    with s.writer() as out:
        for n in s.names:
            r_m, r_t = trimmed_rows(n)
            sign = torch.sign(r_m + r_t)
            sign = torch.where(sign == 0, majority.to(sign.dtype).to(sign.device), sign)
            total = torch.zeros_like(r_m)
            for v in (r_m, r_t):
                total = total + v * torch.where(sign > 0, v > 0, v < 0)
            out.add(n, _store(s.previous[n] + alpha * total, s.store_dtype))
    return passes + 1


# ---- OPCM ---------------------------------------------------------------------------------------------

def _opcm(merger, s: MergeStep) -> int:
    from cl_merge.strategies.opcm import merged_tensor

    merger.reset(None)
    if s.state is not None and "::lambda" in s.state:
        merger.load_state_dict({k: s.state[f"::{k}"] for k in ("lambda", "norm_sum", "count")})
    tau_sq = 0.0
    if s.step == 1:
        with s.writer() as out:
            for n in s.names:
                tau_sq += float(s.tau(n).double().pow(2).sum())
                out.add(n, _store(s.expert[n], s.store_dtype))
        merger._norm_sum += tau_sq ** 0.5
        merger._count += 1
        merger._lambda = 1.0
        _save_scalars(merger, s.state_out)
        return 1

    scratch = s.out_path.with_name(f".{s.out_path.name}.S.safetensors")
    s_sq = 0.0
    lam_prev = merger._lambda
    layout = s.layout()
    with TensorWriter(scratch, layout={n: (torch.float32, layout[n][1]) for n in s.names}) as spool:
        for n in s.names:
            b = s.base[n]
            tau = s.tau(n)
            tau_sq += float(tau.double().pow(2).sum())
            prev_delta = s.previous[n].float() - b.float()
            merged = merged_tensor(n, prev_delta, tau.float(), lam_prev, merger.alpha, merger.rules)
            s_sq += float(merged.double().pow(2).sum())
            spool.add(n, merged.to("cpu"))
    merger._norm_sum += tau_sq ** 0.5
    merger._count += 1
    mean_norm = merger._norm_sum / merger._count
    merged_norm = s_sq ** 0.5
    lam = merged_norm / mean_norm if merged_norm > 0 else 1.0
    merger._lambda = lam
    spooled = TensorSource(scratch, device=s.device, tracker=s.tracker)
    try:
        with s.writer() as out:
            for n in s.names:
                out.add(n, _store(s.base[n].float() + spooled[n] / lam, s.store_dtype))
    finally:
        spooled.close()
        os.unlink(scratch)
    _save_scalars(merger, s.state_out)
    return 2


def _save_scalars(merger, path: Path) -> None:
    with TensorWriter(path) as w:
        for key, value in merger.state_dict().items():
            w.add(f"::{key}", value)

