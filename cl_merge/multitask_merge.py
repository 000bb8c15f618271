"""All-at-once merging: T experts (all fine-tuned from θ0) merged in one call.

The multi-task mergers (ISO-C, ISO-CTS, TSV-M, Fisher averaging, DARE, EpiMer) are defined for this
setting. Each is a ``MultiTaskMerger``: declared hyperparameters (a ``Component``) and

    merge_all(base, experts, *, fishers=None, matrix=None, blocks=None) -> merged state

built from two per-tensor rules on the task vectors δ_t = expert_t − θ0 of one tensor:

* ``merge_matrix(deltas, fishers)`` for the tensors the merger treats as matrices (its spectral rule);
* ``merge_other(deltas, fishers)`` for every other tensor (biases, norms, embeddings, conv kernels).

Both return the tensor's merged update Δ (scaling included); the merged weight is θ0 + Δ. Which
tensors are matrices is the ``matrix(name, tensor)`` predicate (default: 2-D, ``params.is_matrix``);
for the tensors where ``blocks(name, tensor)`` holds (a stacked q/k/v projection), ``merge_matrix``
runs on each of the three row blocks (``tensor_kinds.split_qkv``) and the results are restacked.
The protocol loop passes ``kind_matrix`` / ``kind_blocks``: the rule table ``RULES`` over
``cl_merge.tensor_kinds`` (2-D weights and the 2-D positional embedding are matrices, open_clip's
``in_proj_weight`` is cut into q, k, v as the d × d matrices of HF CLIP that FusionBench merges; conv1,
the class token, biases and norms take ``merge_other``). Whole-model reductions a merger needs before its per-tensor rule (Fisher norms,
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
from .tensor_kinds import Kind, join_qkv, rule_for, split_qkv

MatrixPredicate = Callable[[str, torch.Tensor], bool]

#: which tensors the multitask mergers treat as matrices (module doc): "matrix", "blocks" (q, k, v), "other"
RULES = {Kind.QKV: "blocks", Kind.MATRIX: "matrix", Kind.POSITIONAL: "matrix", Kind.CONV: "other",
         Kind.EMBEDDING: "other", Kind.NORM: "other", Kind.BIAS: "other", Kind.OTHER: "other"}


def default_matrix(name: str, tensor: torch.Tensor) -> bool:
    return is_matrix(tensor)


def kind_matrix(name: str, tensor: torch.Tensor) -> bool:
    """``RULES``: matrices (q/k/v included) get the merger's matrix rule."""
    return rule_for(name, tensor, RULES) in ("matrix", "blocks")


def kind_blocks(name: str, tensor: torch.Tensor) -> bool:
    """``RULES``: a stacked q/k/v projection is merged block by block."""
    return rule_for(name, tensor, RULES) == "blocks"


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
                  matrix: Optional[MatrixPredicate] = None,
                  blocks: Optional[MatrixPredicate] = None) -> StateDict:
        check_inputs(base, experts, fishers, self.needs_fisher, self.name)
        matrix = matrix or default_matrix
        self.prepare(base, experts, fishers)
        out: StateDict = {}
        for name, b in base.items():
            dtype = work_dtype(b)
            deltas = [e[name].to(dtype) - b.to(dtype) for e in experts]
            fs = None if fishers is None else [f[name].to(dtype) for f in fishers]
            if blocks is not None and blocks(name, b):
                update = self._merge_blocks(deltas, fs, name)
            else:
                rule = self.merge_matrix if matrix(name, b) else self.merge_other
                update = rule(deltas, fs, name=name)
            out[name] = (b.to(dtype) + update).to(b.dtype)
        return out

    def _merge_blocks(self, deltas, fishers, name: str) -> torch.Tensor:
        """``merge_matrix`` on the q, k and v row blocks, restacked (blocks named ``name[q]`` etc.)."""
        d_blocks = [split_qkv(d) for d in deltas]
        f_blocks = None if fishers is None else [split_qkv(f) for f in fishers]
        parts = []
        for i, p in enumerate("qkv"):
            fs = None if f_blocks is None else [f[i] for f in f_blocks]
            parts.append(self.merge_matrix([d[i] for d in d_blocks], fs, name=f"{name}[{p}]"))
        return join_qkv(*parts)

    def prepare(self, base: StateDict, experts: List[StateDict], fishers: Optional[List[StateDict]]) -> None:
        """Whole-model reductions before the per-tensor rules (none by default)."""

    def merge_matrix(self, deltas: List[torch.Tensor], fishers: Optional[List[torch.Tensor]] = None, *,
                     name: str = "") -> torch.Tensor:
        raise NotImplementedError

    def merge_other(self, deltas: List[torch.Tensor], fishers: Optional[List[torch.Tensor]] = None, *,
                    name: str = "") -> torch.Tensor:
        raise NotImplementedError



def merge_at_once(merger, base: StateDict, experts: List[StateDict], *,
                  fishers: Optional[List[StateDict]] = None) -> StateDict:
    """The multitask protocol's one merge: ``merge_all`` of a ``MultiTaskMerger`` with the tensor-kind
    rule (``kind_matrix`` / ``kind_blocks``), or, for a continual rule that declares "multitask"
    (``Merger.protocols``), that rule applied expert by expert in memory with start = θ0 (its
    independent-protocol final state, which for task arithmetic, SWA and MagMax is the all-at-once
    merge: θ0 + α Σ_t δ_t, mean_t θ_t, θ0 + α · max-magnitude_t δ_t)."""
    if isinstance(merger, MultiTaskMerger):
        return merger.merge_all(base, experts, fishers=fishers, matrix=kind_matrix, blocks=kind_blocks)
    if "multitask" not in getattr(merger, "protocols", ()):
        raise UserError(f"merger {merger.name} does not support the multitask protocol")
    merger.reset()
    deployed = base
    for t, expert in enumerate(experts, start=1):
        deployed = merger.merge(base, deployed, expert, base, t)
    return deployed
