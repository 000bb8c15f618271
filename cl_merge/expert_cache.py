"""Independent-protocol experts depend only on (θ0, task data, learner config, seed): train each
once and let every merging strategy and order reuse it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

from .io import load_tensors, save_tensors_atomic
from .params import StateDict


def expert_key(base_fingerprint: str, task_fingerprint: str, learner: str,
               learner_config: Dict[str, Any], seed: int) -> str:
    payload = json.dumps([base_fingerprint, task_fingerprint, learner, learner_config, seed],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class ExpertCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> Optional[StateDict]:
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            state = load_tensors(path)
        except Exception:  # a damaged entry is retrained, never trusted
            self.misses += 1
            return None
        self.hits += 1
        return state

    def put(self, key: str, state: StateDict) -> None:
        save_tensors_atomic(self._path(key), state)
