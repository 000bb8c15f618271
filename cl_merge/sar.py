"""Subspace alignment ratio (SAR) between a task's own update and the deployed model's update.

    SAR(Δ_task, Δ_merged; k) = ‖Π_k Δ_task‖_F / ‖Δ_task‖_F          (per 2-D weight matrix)

Π_k = U_k U_kᵀ projects on the top-k left singular vectors of Δ_merged = deployed − θ0, and k is the
smallest rank whose retained energy sqrt(Σ_{j≤k} σ_j² / Σ_j σ_j²) reaches ``energy`` (0.95), the
crossing component included. Since U_k is orthonormal, ‖Π_k Δ‖_F = ‖U_kᵀ Δ‖_F.

Conventions:

- Layers (``RULES``, kinds from ``cl_merge.tensor_kinds``): every 2-D weight matrix and the 2-D
  positional embedding is one layer; open_clip's stacked ``attn.in_proj_weight`` is three layers
  (q, k, v; keys ``name[q]``, ``name[k]``, ``name[v]``), as the d × d matrices of HF CLIP that the
  reference code scores (``qkv="stacked"`` scores it as one 3d × d matrix). conv1 (4-D), biases,
  norms and the class token do not enter SAR.
- Δ_task is the task's own update, expert − start (= expert − θ0 under the independent protocol).
- A layer is skipped for a task when its Δ_task is exactly zero (no update to align: e.g. a layer
  a sparse learner never touched) and for every task when its Δ_merged is zero (no subspace) or a
  matrix is not finite. Skips are counted in the results (``sar_skipped_layers``).
- Per task: mean over the remaining layers. Over tasks: mean of the per-task values.
- The basis of the CURRENT merged model is computed once per step and shared by every task scored
  at that step; it is never recomputed or overwritten inside the loop over tasks.

Cost: one thin SVD per 2-D matrix per step (float32, on the model's device) plus one k×n product per
(task, layer). Scoring past tasks (``run.sar_store=true``) keeps each task's 2-D updates on disk in
bfloat16 (the float32 exponent range: updates of order 1e-6 do not underflow as they would in
float16), read back one layer at a time, so memory stays O(1) in the number of tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .errors import UserError
from .params import StateDict
from .tensor_kinds import Kind, RuleTable, rule_for, split_qkv

DEFAULT_ENERGY = 0.95
#: which tensors are SAR layers: "matrix" (one layer), "blocks" (q, k, v: three layers), "skip"
RULES: Dict[Kind, str] = {Kind.QKV: "blocks", Kind.MATRIX: "matrix", Kind.POSITIONAL: "matrix",
                          Kind.CONV: "skip", Kind.EMBEDDING: "skip", Kind.NORM: "skip", Kind.BIAS: "skip",
                          Kind.OTHER: "skip"}
STACKED_RULES: Dict[Kind, str] = {**RULES, Kind.QKV: "matrix"}


def rule_table(qkv: str = "split") -> Dict[Kind, str]:
    if qkv not in ("split", "stacked"):
        raise ValueError(f"qkv must be split or stacked; got {qkv!r}")
    return dict(RULES if qkv == "split" else STACKED_RULES)


def sar_layers(name: str, tensor: torch.Tensor, table: RuleTable = RULES) -> List[tuple]:
    """(layer key, 2-D tensor) pairs that ``tensor`` contributes to SAR (module doc)."""
    rule = rule_for(name, tensor, table)
    if rule == "matrix":
        return [(name, tensor)]
    if rule == "blocks":
        return [(f"{name}[{p}]", b) for p, b in zip("qkv", split_qkv(tensor))]
    return []
STORE_DTYPE = torch.bfloat16
# CPU work on matrices below this many elements runs on one intra-op thread: there, thread start-up and
# synchronisation cost more than they save (measured on 2 busy shared cores: a 384x96 SVD took 1.1 s
# on two threads and 2 ms on one)
SINGLE_THREAD_NUMEL = 1 << 18


@contextlib.contextmanager
def _threads_for(m: torch.Tensor):
    if m.device.type != "cpu" or m.numel() >= SINGLE_THREAD_NUMEL or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def energy_rank(singular_values: torch.Tensor, energy: float = DEFAULT_ENERGY) -> int:
    """Smallest k with sqrt(Σ_{j≤k} σ_j² / Σ σ_j²) ≥ energy (singular values in descending order).
    0 when every σ is zero (no subspace)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy}")
    s2 = singular_values.detach().double().pow(2)
    total = float(s2.sum())
    if total <= 0.0:
        return 0
    retained = torch.sqrt(torch.cumsum(s2, 0) / total)
    hits = torch.nonzero(retained >= energy)
    # rounding can leave the last cumulative value a hair under 1.0 when energy = 1: keep everything
    return int(hits[0]) + 1 if len(hits) else len(s2)


def top_basis(delta_merged: torch.Tensor, energy: float = DEFAULT_ENERGY) -> Optional[torch.Tensor]:
    """U_k (rows × k) of a 2-D update, or None when the update is zero or not finite."""
    m = delta_merged.detach().float()
    with _threads_for(m):
        if not bool(torch.isfinite(m).all()) or not bool(m.any()):
            return None
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        k = energy_rank(s, energy)
        return u[:, :k].contiguous() if k else None


def layer_sar(delta_task: torch.Tensor, basis: torch.Tensor) -> Optional[float]:
    """‖U_k U_kᵀ Δ‖_F / ‖Δ‖_F for one matrix; None when Δ is zero or not finite."""
    d = delta_task.detach().to(basis.device, torch.float32)
    with _threads_for(d):
        norm = float(torch.linalg.vector_norm(d.double()))
        if norm == 0.0 or not math.isfinite(norm):
            return None
        projected = float(torch.linalg.vector_norm((basis.T @ d).double()))
    return min(projected / norm, 1.0)  # rounding can put a fully contained update a hair above 1


@dataclasses.dataclass
class TaskSAR:
    value: Optional[float]  # mean over scored layers; None when no layer could be scored
    layers: int  # layers that entered the mean
    skipped: int  # 2-D layers skipped (zero / non-finite Δ_task, or no basis)


class _TaskScore:
    """One task's SAR gathered layer by layer (mean over the layers that could be scored)."""

    def __init__(self):
        self.values: List[float] = []
        self.skipped = 0

    def add(self, basis: Optional[torch.Tensor], delta_task: Optional[torch.Tensor]) -> None:
        v = None if (basis is None or delta_task is None) else layer_sar(delta_task, basis)
        if v is None:
            self.skipped += 1
        else:
            self.values.append(v)

    def result(self) -> TaskSAR:
        values = self.values
        return TaskSAR(sum(values) / len(values) if values else None, len(values), self.skipped)


class MergedBasis:
    """The per-layer top-k left singular bases of one merged update Δ_merged = deployed − θ0.

    Built once; ``score`` then evaluates any number of tasks against the same bases. (``SARMeter``
    works layer by layer instead, so a step never holds every layer's basis at once.)"""

    def __init__(self, delta_merged: StateDict, energy: float = DEFAULT_ENERGY, table: RuleTable = RULES):
        self.energy = energy
        self.table = table
        self.bases: Dict[str, Optional[torch.Tensor]] = {}
        self._where: Dict[str, tuple] = {}  # layer key -> (parameter name, block index)
        for name, d in delta_merged.items():
            for i, (key, block) in enumerate(sar_layers(name, d, table)):
                self.bases[key] = top_basis(block, energy)
                self._where[key] = (name, i)
        self.ranks: Dict[str, int] = {k: (0 if b is None else b.shape[1]) for k, b in self.bases.items()}

    @classmethod
    def from_states(cls, deployed: StateDict, theta0: StateDict, energy: float = DEFAULT_ENERGY,
                    table: RuleTable = RULES) -> "MergedBasis":
        return cls({k: deployed[k] - theta0[k] for k in deployed if sar_layers(k, deployed[k], table)}, energy, table)

    @property
    def parameters(self) -> List[str]:
        """The parameters whose layers enter SAR (what ``score`` reads of a task's update)."""
        return sorted({name for name, _ in self._where.values()})

    def score(self, delta_task: StateDict) -> TaskSAR:
        acc = _TaskScore()
        for key, basis in self.bases.items():
            name, i = self._where[key]
            d = delta_task.get(name)
            acc.add(basis, None if d is None else sar_layers(name, d, self.table)[i][1])
        return acc.result()


def mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


class SARMeter:
    """SAR of every step of a run, over any parameter store (name -> tensor mappings, read one
    tensor at a time: a step holds one layer's basis and updates, never a model's worth).

    Always: the current task's SAR against the current merged model (``current``). With a
    ``store_dir``: each task's Δ_task is written there (bfloat16, tensor by tensor) and every step
    scores all tasks seen so far against the current merged basis (``per_task``), the run's ``sar``
    being their mean. The store lives inside the run's checkpoint directory, so a resumed run finds
    the earlier tasks' updates and the directory disappears with the checkpoint once the results
    exist. ``scope`` names what ``sar`` averages: "current_task" or "seen_tasks"."""

    def __init__(self, energy: float = DEFAULT_ENERGY, store_dir: Optional[Path] = None, qkv: str = "split"):
        self.energy = energy
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.table = rule_table(qkv)

    @property
    def scope(self) -> str:
        return "seen_tasks" if self.store_dir is not None else "current_task"

    def _path(self, step: int) -> Path:
        return self.store_dir / f"task-{step}.safetensors"

    def step(self, step: int, theta0: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
             expert: Mapping[str, torch.Tensor], deployed: Mapping[str, torch.Tensor]) -> Dict[str, object]:
        """Score step ``step`` (1-based). Returns the per-step record fields."""
        from .streaming import TensorSource, TensorWriter

        past = []
        if self.store_dir is not None:
            for s in range(1, step):
                path = self._path(s)
                if not path.exists():
                    raise UserError(f"SAR store {self.store_dir} lacks task {s}'s update ({path.name}); delete "
                                    f"{self.store_dir.parent} and rerun without --resume")
                past.append(TensorSource(path, verify=True))  # our own file: hashes checked
        writer = TensorWriter(self._path(step)) if self.store_dir is not None else None
        scores = [_TaskScore() for _ in range(len(past) + 1)]  # past tasks, then the current one
        ranks: List[int] = []
        try:
            for name in theta0:
                b = theta0[name]
                if not sar_layers(name, b, self.table):
                    continue
                delta = expert[name] - start[name]  # Δ_task = expert − start
                if writer is not None:
                    writer.add(name, delta.to(STORE_DTYPE))
                merged = sar_layers(name, deployed[name] - b, self.table)
                task = sar_layers(name, delta, self.table)
                stored = [sar_layers(name, source[name], self.table) if name in source else None for source in past]
                for i, ((_, m), (_, d)) in enumerate(zip(merged, task)):  # q, k, v blocks are layers of their own
                    basis = top_basis(m, self.energy)  # once per layer, shared below
                    ranks.append(0 if basis is None else basis.shape[1])
                    for layers, score in zip(stored, scores):
                        score.add(basis, None if layers is None else layers[i][1])
                    scores[-1].add(basis, d)  # the current task from its full-precision update
                del b, delta, merged, task, stored
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
        current = scores[-1].result()
        out: Dict[str, object] = {"current": current.value, "skipped_layers": current.skipped,
                                  "rank_mean": sum(ranks) / len(ranks) if ranks else None, "per_task": None}
        if self.store_dir is None:
            out["sar"] = current.value
            return out
        per_task = [score.result().value for score in scores]
        out["per_task"] = per_task
        out["sar"] = mean_or_none(per_task)
        return out
