"""Atomic file writes: a temp file in the same directory, then os.replace. A reader never sees a
half-written results file, checkpoint or cache entry."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: os.PathLike, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), write)


def write_text_atomic(path: os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(Path(path), write)


def save_tensors_atomic(path: os.PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def load_tensors(path: os.PathLike) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
