"""Parameter stores: where the protocol loop keeps θ0, the experts, the deployed model and the
merger's state.

A parameter store is a ``name -> tensor`` mapping (read one tensor) with ``spec(name)`` (dtype and
shape without reading); a step's outputs are written one tensor at a time through a writer whose
``commit`` makes the new store appear whole (or, on ``abort``, not at all). Two backends:

* ``MemoryStorage``: stores are dicts (``MemoryStore``); the default for every benchmark whose
  model fits in memory a few times over.
* ``DiskStorage``: stores are safetensors files read lazily (``cl_merge.streaming.TensorSource``)
  and written tensor by tensor (``TensorWriter``, atomic rename on commit), in the run's checkpoint
  folder; θ0 and the experts are read from their checkpoints. The only model in memory is the
  adapter's; "deploying" a state copies its tensors into it one at a time. MergeBench asks for it.

The protocol loop (``cl_merge.protocol``) and the merge executor (``cl_merge.merge_engine``) see only
this interface, so a run is the same algorithm, with the same record, on either backend.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .errors import UserError
from .merge_engine import StoreWriter
from .params import nbytes
from .streaming import LiveTensors, TensorSource, TensorWriter, checkpoint_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MemoryStore(dict):
    """An in-memory parameter store: a plain ``name -> tensor`` dict plus ``spec``."""

    def spec(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        t = self[name]
        return t.dtype, tuple(t.shape)


class MemoryWriter(StoreWriter):
    def __init__(self):
        self._tensors = MemoryStore()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._tensors:
            raise ValueError(f"tensor {name} written twice")
        self._tensors[name] = tensor

    def commit(self) -> MemoryStore:
        return self._tensors

    def abort(self) -> None:
        self._tensors = MemoryStore()


class DiskWriter(StoreWriter):
    """A safetensors file written tensor by tensor; ``commit`` renames it into place and opens it."""

    def __init__(self, path: Path, layout=None, read_dtype: Optional[torch.dtype] = None, device: str = "cpu",
                 tracker: Optional[LiveTensors] = None, metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self._layout = layout
        self._writer = TensorWriter(self.path, layout=layout, metadata=metadata)
        self._read = dict(dtype=read_dtype, device=device, tracker=tracker)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._layout is not None:
            tensor = tensor.to(dtype=self._layout[name][0])
        self._writer.add(name, tensor)

    def commit(self) -> TensorSource:
        self._writer.close()
        return TensorSource(self.path, **self._read)

    def abort(self) -> None:
        self._writer.abort()


class Storage:
    """A parameter-store backend (module doc). The protocol loop asks it for every store it uses."""

    kind: str = ""
    experts_from_files: bool = False  # True: experts are opened from files (``Learner.open_expert``)

    def check_run(self, protocol: str, learner) -> None:
        """Refuse a run this backend cannot do (one clear UserError)."""

    def theta0(self, adapter) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError

    def empty_state(self) -> Mapping[str, torch.Tensor]:
        return MemoryStore()

    def wrap(self, tensors: Dict[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """An in-memory dict (a trained or cached expert) as a store of this backend."""
        return MemoryStore(tensors)

    def open_expert(self, learner, task, names: List[str]) -> Tuple[Mapping[str, torch.Tensor], str]:
        raise NotImplementedError

    def writers(self, step: int):
        """(deployed, state, scratch) writer factories and the scratch release for ``step``."""
        raise NotImplementedError

    @contextlib.contextmanager
    def showing_expert(self, adapter, expert: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """The adapter computes with the expert inside the block (for its own-task evaluation)."""
        adapter.set_state(expert)
        yield

    def checkpoint_tensors(self, deployed, state) -> Dict[str, Dict[str, torch.Tensor]]:
        """Tensor groups the step's checkpoint must hold for a resume."""
        raise NotImplementedError

    def checkpoint_record(self, deployed, state) -> Dict[str, Any]:
        """Record entries (JSON) the step's checkpoint must hold for a resume: the store files, if any."""
        return {"store_files": None}

    def restore(self, record: Dict[str, Any], tensors: Dict[str, Dict[str, torch.Tensor]]):
        """(deployed, state) of a checkpoint written by this backend."""
        raise NotImplementedError

    def discard(self, *stores) -> None:
        """Stores no longer needed (their step's successor is checkpointed)."""

    def step_info(self, deployed, state) -> Dict[str, Any]:
        return {}

    def tracker_peak(self) -> Optional[int]:
        return None

    def reset_peak(self) -> None:
        pass


class MemoryStorage(Storage):
    kind = "memory"

    def theta0(self, adapter) -> MemoryStore:
        return MemoryStore(adapter.get_state())

    def writers(self, step: int):
        return MemoryWriter, MemoryWriter, MemoryWriter, (lambda store: None)

    def checkpoint_tensors(self, deployed, state):
        return {"deployed": dict(deployed), "merger": dict(state)}

    def restore(self, record, tensors):
        return MemoryStore(tensors["deployed"]), MemoryStore(tensors.get("merger", {}))

    def step_info(self, deployed, state) -> Dict[str, Any]:
        return {"deployed_bytes": nbytes([deployed]), "state_bytes": nbytes([state])}


class DiskStorage(Storage):
    """θ0 and experts read tensor by tensor from safetensors checkpoints; the deployed model and the
    merger state written tensor by tensor into ``work_dir`` (module doc).

    ``store_dtype``: dtype of the deployed files (merging itself reads everything as float32);
    ``device``: where a tensor's merge math runs; ``expert_eval_full``: an expert is evaluated with all
    its tensors (e.g. an LLM's embeddings and head too), the model is put back to θ0 afterwards."""

    kind = "disk"
    experts_from_files = True

    def __init__(self, base_path: Path, work_dir: Path, names: List[str], model_names: List[str],
                 store_dtype: str = "float32", device: str = "cpu", expert_eval_full: bool = True,
                 tracker: Optional[LiveTensors] = None):
        self.base_path = Path(base_path)
        self.work_dir = Path(work_dir)
        self.names = list(names)
        self.model_names = list(model_names)
        self.store_dtype = DTYPES[store_dtype]
        self.device = device
        self.expert_eval_full = expert_eval_full
        self.tracker = tracker or LiveTensors()
        self._base: Optional[TensorSource] = None

    def check_run(self, protocol: str, learner) -> None:
        if protocol != "independent":
            raise UserError("this benchmark merges published experts: only --protocol independent runs here "
                            "(sequential fine-tuning on its training data is not implemented)")
        if not learner.opens_experts:
            raise UserError(f"learner {learner.name} trains its experts; this benchmark streams experts from "
                            "checkpoints: use --learner checkpoint")

    def _source(self, path, label, names=None, dtype: Optional[torch.dtype] = torch.float32,
                verify: Optional[bool] = None) -> TensorSource:
        return TensorSource(path, names=self.names if names is None else names, dtype=dtype, device=self.device,
                            tracker=self.tracker, label=label, verify=verify)

    def theta0(self, adapter) -> TensorSource:
        if self._base is None:
            self._base = self._source(self.base_path, f"base {self.base_path}")
        return self._base

    def open_expert(self, learner, task, names):
        path = learner.expert_path(task)
        return self._source(path, f"expert {task.name} ({path})", names), f"checkpoint:{path}"

    def writers(self, step: int):
        self.work_dir.mkdir(parents=True, exist_ok=True)
        base = self.theta0(None)
        layout = {n: (self.store_dtype, tuple(base.spec(n)[1])) for n in self.names}

        def deployed():
            return DiskWriter(self.work_dir / f"deployed-{step}.safetensors", layout=layout,
                              read_dtype=torch.float32, device=self.device, tracker=self.tracker,
                              metadata={"step": str(step)})

        def state():
            return DiskWriter(self.work_dir / f"merger-state-{step}.safetensors", device=self.device,
                              tracker=self.tracker)

        def scratch():
            return DiskWriter(self.work_dir / f".intermediate-{step}.safetensors", device=self.device,
                              tracker=self.tracker)

        return deployed, state, scratch, self._remove

    def _remove(self, store) -> None:
        path = getattr(store, "path", None)
        if path is not None and Path(path).parent == self.work_dir and Path(path).exists():
            store.close()
            os.unlink(path)

    @contextlib.contextmanager
    def showing_expert(self, adapter, expert) -> Iterator[None]:
        if not self.expert_eval_full:
            adapter.set_state(expert)
            yield
            return
        path = Path(str(expert.path))
        names = [n for n in self.model_names if n in checkpoint_files(path)]
        _copy_into(adapter.model, TensorSource(path, names=names, tracker=self.tracker))
        try:
            yield
        finally:  # back to θ0 everywhere (the tensors that are not merged included)
            base = [n for n in self.model_names if n in checkpoint_files(self.base_path)]
            _copy_into(adapter.model, TensorSource(self.base_path, names=base, tracker=self.tracker))

    def checkpoint_tensors(self, deployed, state):
        return {}

    def checkpoint_record(self, deployed, state):
        return {"store_files": {"deployed": str(deployed.path), "state": str(state.path)}}

    def restore(self, record, tensors):
        files = record.get("store_files")
        if not files:
            return self.theta0(None), self.empty_state()
        for p in files.values():
            if not Path(p).exists():
                raise UserError(f"checkpoint lacks {p}; delete {self.work_dir.parent} and rerun without --resume")
        # written by this harness: every tensor is checked against its recorded content hash
        deployed = self._source(files["deployed"], "deployed (resumed)", verify=True)
        state = TensorSource(files["state"], device=self.device, tracker=self.tracker, verify=True)
        return deployed, state

    def discard(self, *stores) -> None:
        for store in stores:
            self._remove(store)

    def step_info(self, deployed, state) -> Dict[str, Any]:
        return {"deployed_bytes": Path(deployed.path).stat().st_size, "state_bytes": Path(state.path).stat().st_size}

    def tracker_peak(self) -> Optional[int]:
        return self.tracker.peak

    def reset_peak(self) -> None:
        self.tracker.reset_peak()


@torch.no_grad()
def _copy_into(model: torch.nn.Module, source: Mapping[str, torch.Tensor]) -> None:
    """Copy ``source``'s tensors into the same-named parameters of ``model``, one at a time."""
    params = dict(model.named_parameters())
    for name in source:
        p = params.get(name)
        if p is not None:
            p.copy_(source[name].to(device=p.device, dtype=p.dtype))
