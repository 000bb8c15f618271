"""Atomic file writes: a temp file in the same directory, then os.replace. A reader never sees a
half-written results file, checkpoint or cache entry."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import torch


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: changing the umask is process-wide


def atomic_write(path: os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``. The file gets the
    permissions of a plainly created one (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: os.PathLike, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(Path(path), write)


def write_text_atomic(path: os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(Path(path), write)


def save_tensors_atomic(path: os.PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def load_tensors(path: os.PathLike) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
