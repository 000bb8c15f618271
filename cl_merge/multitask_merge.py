"""All-at-once merging: T experts (all fine-tuned from θ0) merged in one call.

The multi-task mergers (ISO-C, ISO-CTS, TSV-M, Fisher averaging, DARE, EpiMer) are defined for this
setting. Each is a ``MultiTaskMerger``: declared hyperparameters (a ``Component``) and

    merge_all(base, experts, *, fishers=None, matrix=None) -> merged state

built from two per-tensor rules on the task vectors δ_t = expert_t − θ0 of one tensor:

* ``merge_matrix(deltas, fishers)`` for the tensors the merger treats as matrices (its spectral rule);
* ``merge_other(deltas, fishers)`` for every other tensor (biases, norms, embeddings, conv kernels).

Both return the tensor's merged update Δ (scaling included); the merged weight is θ0 + Δ. Which
tensors are matrices is the ``matrix(name, tensor)`` predicate (default: 2-D, ``params.is_matrix``);
splitting a stacked q/k/v projection into its blocks is the caller's business (call ``merge_matrix``
on each block). Whole-model reductions a merger needs before its per-tensor rule (Fisher norms,
TIES' global trim threshold) are computed inside ``merge_all`` and named in each merger's docstring.

Inputs are checked first (same names and shapes everywhere, a Fisher diagonal per expert where the
merger needs one); a bad input raises one ``UserError`` line and nothing is computed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, List, Optional, Sequence, Tuple

import torch

from .components import Component
from .errors import UserError
from .params import StateDict, is_matrix

MatrixPredicate = Callable[[str, torch.Tensor], bool]


def default_matrix(name: str, tensor: torch.Tensor) -> bool:
    return is_matrix(tensor)


def check_inputs(base: StateDict, experts: Sequence[StateDict], fishers: Optional[Sequence[StateDict]],
                 needs_fisher: bool, who: str) -> None:
    """One UserError line naming the first problem in the inputs of ``merge_all``."""
    if not experts:
        raise UserError(f"{who} needs at least one expert; got none")
    for i, expert in enumerate(experts):
        if expert.keys() != base.keys():
            diff = sorted(set(expert) ^ set(base))[:3]
            raise UserError(f"{who}: expert {i} and the base model hold different parameters (e.g. {diff})")
        for name, tensor in expert.items():
            if tensor.shape != base[name].shape:
                raise UserError(f"{who}: expert {i} has shape {tuple(tensor.shape)} for '{name}', "
                                f"the base model {tuple(base[name].shape)}")
    if fishers is None:
        if needs_fisher:
            raise UserError(f"{who} needs each expert's Fisher diagonal (fishers=...); compute them with "
                            "cl_merge.fisher.fisher_diagonal")
        return
    if len(fishers) != len(experts):
        raise UserError(f"{who}: {len(fishers)} Fisher diagonals for {len(experts)} experts; give one per expert")
    for i, fisher in enumerate(fishers):
        missing = [n for n in base if n not in fisher]
        if missing:
            raise UserError(f"{who}: the Fisher diagonal of expert {i} lacks '{missing[0]}'")
        for name in base:
            f = fisher[name]
            if f.shape != base[name].shape:
                raise UserError(f"{who}: Fisher diagonal {i} has shape {tuple(f.shape)} for '{name}', "
                                f"the parameter {tuple(base[name].shape)}")
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise UserError(f"{who}: Fisher diagonal {i} of '{name}' is not finite and non-negative")


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Merging arithmetic runs in float32 (float64 inputs stay float64)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def mean(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(deltas)).mean(0)


def per_task_rank(shape: Tuple[int, ...], tasks: int, k: Optional[int], fraction: Optional[float]) -> int:
    """Rank kept per task for the concatenated-factor methods (TSV-M, EpiMer): ``k`` if given, else
    ⌊fraction·r⌋ (FusionBench's ``int(r · 1/T)`` when ``fraction`` is None), capped at ⌊r/T⌋ so the
    T·k concatenated singular vectors fit in the r = min(m, n) dimensions they are whitened in."""
    r = min(shape)
    cap = r // tasks
    if k is None:
        k = int(r * (1.0 / tasks if fraction is None else fraction))
    return max(0, min(k, cap))


@dataclasses.dataclass
class MultiTaskMerger(Component):
    #: the protocols this merger supports (all-at-once only, until a continual variant exists)
    protocols: ClassVar[Tuple[str, ...]] = ("multitask",)
    #: whether ``merge_all`` needs ``fishers``
    needs_fisher: ClassVar[bool] = False

    def merge_all(self, base: StateDict, experts: List[StateDict], *,
                  fishers: Optional[List[StateDict]] = None,
                  matrix: Optional[MatrixPredicate] = None) -> StateDict:
        check_inputs(base, experts, fishers, self.needs_fisher, self.name)
        matrix = matrix or default_matrix
        self.prepare(base, experts, fishers)
        out: StateDict = {}
        for name, b in base.items():
            dtype = work_dtype(b)
            deltas = [e[name].to(dtype) - b.to(dtype) for e in experts]
            fs = None if fishers is None else [f[name].to(dtype) for f in fishers]
            rule = self.merge_matrix if matrix(name, b) else self.merge_other
            out[name] = (b.to(dtype) + rule(deltas, fs, name=name)).to(b.dtype)
        return out

    def prepare(self, base: StateDict, experts: List[StateDict], fishers: Optional[List[StateDict]]) -> None:
        """Whole-model reductions before the per-tensor rules (none by default)."""

    def merge_matrix(self, deltas: List[torch.Tensor], fishers: Optional[List[torch.Tensor]] = None, *,
                     name: str = "") -> torch.Tensor:
        raise NotImplementedError

    def merge_other(self, deltas: List[torch.Tensor], fishers: Optional[List[torch.Tensor]] = None, *,
                    name: str = "") -> torch.Tensor:
        raise NotImplementedError

