"""Independent-protocol experts depend only on (θ0, task data, learner config, seed): train each
once and let every merging strategy and order reuse it.

Processes sharing a cache coordinate through one lock file per entry (``filelock``): the first that
misses an entry holds its lock while it trains and writes it; the others wait for the lock, then read
the entry. An entry whose content hash, names, shapes or dtypes do not match is removed and trained
again, with one warning line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from filelock import FileLock, Timeout

from .divergence import first_non_finite
from .io import DamagedFile, load_tensors, save_tensors_atomic, warn
from .params import StateDict


def expert_key(base_fingerprint: str, task_fingerprint: str, learner: str,
               learner_config: Dict[str, Any], seed: int) -> str:
    payload = json.dumps([base_fingerprint, task_fingerprint, learner, learner_config, seed],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def layout_of(state: StateDict) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
    """name -> (shape, dtype): what a cached expert must match."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def layout_mismatch(state: StateDict, expected: Dict[str, Tuple[Tuple[int, ...], Any]]) -> Optional[str]:
    if state.keys() != expected.keys():
        diff = sorted(set(state) ^ set(expected))[:3]
        return f"parameter names differ from the model's (e.g. {', '.join(diff)})"
    for name, (shape, dtype) in expected.items():
        t = state[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            return f"{name} is {tuple(t.shape)} {t.dtype}, the model expects {shape} {dtype}"
    return None


class ExpertCache:
    def __init__(self, directory: Path, expected: Optional[Dict[str, Tuple[Tuple[int, ...], Any]]] = None):
        self.directory = Path(directory)
        self.expected = expected  # layout_of(θ0), when known
        self.hits = 0
        self.misses = 0
        self._held: Dict[str, FileLock] = {}

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _lock(self, key: str) -> FileLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.directory / f".{key}.lock"))

    def _read(self, key: str) -> Tuple[Optional[StateDict], Optional[str]]:
        """(state, None), or (None, why it cannot be used); a missing entry is (None, None)."""
        path = self._path(key)
        if not path.exists():
            return None, None
        try:
            state = load_tensors(path)
        except DamagedFile as exc:
            return None, exc.reason
        except FileNotFoundError:
            return None, None
        if self.expected is not None:
            why = layout_mismatch(state, self.expected)
            if why is not None:
                return None, why
        return state, None

    def peek(self, key: str) -> Optional[StateDict]:
        """The cached expert, or None; never locks, never trains (a read-only look-up)."""
        return self._read(key)[0]

    def get(self, key: str) -> Optional[StateDict]:
        """The cached expert, or None; on None this process holds the entry's lock until ``put`` (or
        ``release``), so another process wanting the same expert waits for it instead of training it."""
        state, _ = self._read(key)
        if state is not None:
            self.hits += 1
            return state
        lock = self._lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            warn(f"waiting for another process to finish training expert {key}")
            lock.acquire()
        state, why = self._read(key)  # it may have been written while we waited
        if state is not None:
            lock.release()
            self.hits += 1
            return state
        if why is not None:
            warn(f"cached expert {self._path(key)} cannot be used ({why}); training it again")
            self._path(key).unlink(missing_ok=True)
        self._held[key] = lock
        self.misses += 1
        return None

    def put(self, key: str, state: StateDict) -> None:
        """Store a trained expert; a non-finite one is never stored (the protocol reports the divergence)."""
        try:
            if first_non_finite(state) is None:
                save_tensors_atomic(self._path(key), state)
        finally:
            self._release(key)

    # ---- what is derived from an expert, stored beside it (e.g. its Fisher diagonal) -------------------
    def _side_path(self, key: str, tag: str) -> Path:
        return self.directory / f"{key}.{tag}.safetensors"

    def get_side(self, key: str, tag: str) -> Optional[StateDict]:
        """The tensors stored beside expert ``key`` under ``tag``, or None (a damaged or mismatched file
        is removed with one warning line and recomputed by the caller)."""
        path = self._side_path(key, tag)
        try:
            state = load_tensors(path)
        except FileNotFoundError:
            return None
        except DamagedFile as exc:
            warn(f"cached {tag} {path} cannot be used ({exc.reason}); computing it again")
            path.unlink(missing_ok=True)
            return None
        why = None
        if self.expected is not None:  # names and shapes (a Fisher is float32 whatever the weights' dtype)
            why = layout_mismatch(state, {k: (shape, state[k].dtype if k in state else None)
                                          for k, (shape, _) in self.expected.items()})
        if why is not None:
            warn(f"cached {tag} {path} cannot be used ({why}); computing it again")
            path.unlink(missing_ok=True)
            return None
        return state

    def put_side(self, key: str, tag: str, state: StateDict) -> None:
        if first_non_finite(state) is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_tensors_atomic(self._side_path(key, tag), state)

    def _release(self, key: str) -> None:
        lock = self._held.pop(key, None)
        if lock is not None:
            lock.release()

    def release(self) -> None:
        """Release every entry lock still held (a fit that failed before ``put``)."""
        for key in list(self._held):
            self._release(key)
