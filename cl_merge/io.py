"""Atomic file writes: a temp file in the same directory, then os.replace. A reader never sees a
half-written results file, checkpoint or cache entry.

- Temp files carry a recognisable name, ``.<target>.<host>-<pid>-<random>.cl_merge-tmp``, so that
  ``sweep_temps`` can remove the ones a killed process left behind (and only those: a live process's
  temp is never touched).
- Every tensor file carries a content hash (sha256 over names, dtypes, shapes and bytes) in its
  safetensors metadata; ``load_tensors`` checks it and raises ``DamagedFile`` on any mismatch.
- An OSError while writing is re-raised naming the target path, for the CLI's one-line message.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .errors import UserError

TEMP_SUFFIX = ".cl_merge-tmp"
HASH_KEY = "cl_merge.sha256"
_HOST = socket.gethostname()


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: changing the umask is process-wide


class DamagedFile(UserError):
    """A tensor file that cannot be trusted: unreadable, without a content hash, or not matching it."""

    def __init__(self, path: os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged ({reason}); delete it and rerun")


def warn(message: str) -> None:
    """One warning line on stderr (the run goes on)."""
    print(f"cl-merge: warning: {message}", file=sys.stderr, flush=True)


def atomic_write(path: os.PathLike, write: Callable[[str], None], suffix: str = TEMP_SUFFIX) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``. The file gets the
    permissions of a plainly created one (mkstemp's are owner-only)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=suffix)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.filename is None or str(exc.filename).endswith(suffix):  # name the target, not our temp
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def temp_path(path: os.PathLike) -> Path:
    """A fresh name for a temp file beside ``path``, in the sweepable form (for writers that open the file
    themselves, e.g. cl_merge.streaming's TensorWriter)."""
    import secrets

    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _unlink_quietly(tmp: Optional[str]) -> None:
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^/]+)-(?P<pid>\d+)-[a-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


# temp names of earlier cl_merge versions (``.<target>.<random>.tmp``): no owner recorded, so only swept
# once they are old enough that no write can still be going on
_LEGACY_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
LEGACY_TEMP_AGE_S = 24 * 3600


def _stale(p: Path, now: float) -> bool:
    m = _TEMP_RE.match(p.name)
    if m is not None:
        return m.group("host") == _HOST and not _pid_alive(int(m.group("pid")))
    if _LEGACY_TEMP_RE.match(p.name):
        try:
            return now - p.stat().st_mtime > LEGACY_TEMP_AGE_S
        except OSError:
            return False
    return False


def sweep_temps(directory: os.PathLike) -> int:
    """Remove the temp files a dead process of this host left in ``directory`` and its subdirectories
    (checkpoints' ``sar/``); returns how many. A live process's temp is never touched."""
    import time

    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed, now = 0, time.time()
    for p in [*directory.rglob(f"*{TEMP_SUFFIX}"), *directory.rglob("*.tmp")]:
        if p.is_file() and _stale(p, now):
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
    return removed


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


def content_hash(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashlib releases the GIL on large buffers
    return h.hexdigest()


_OS_CODE = re.compile(r"(?:code: |os error )(\d+)")  # how safetensors' Rust side names the OS error


def save_tensors_atomic(path: os.PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata or {}, **{HASH_KEY: content_hash(contiguous)})

    def write(tmp):
        try:
            save_file(contiguous, tmp, metadata=meta)
        except OSError:
            raise
        except Exception as exc:  # safetensors reports I/O failures as its own error type
            code = _OS_CODE.search(str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc

    atomic_write(Path(path), write)


def load_tensors(path: os.PathLike, verify: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors of ``path``; with ``verify`` (the default) their content hash must match the one the
    file was written with (``DamagedFile`` otherwise; a missing file raises FileNotFoundError)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise DamagedFile(path, f"unreadable: {exc.__class__.__name__}") from None
    if verify:
        expected = meta.get(HASH_KEY)
        if expected is None:
            raise DamagedFile(path, "no content hash")
        if content_hash(tensors) != expected:
            raise DamagedFile(path, "content hash mismatch")
    return tensors


_REASONS = {
    errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a parent is not a directory", errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file or directory", errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "name too long",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the path, the reason in words, and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    reason = _REASONS.get(exc.errno, exc.strerror or exc.__class__.__name__)
    name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    fix = "free some space or choose another location" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "choose a writable location (--out, run.cache_dir, --markdown, ...)"
    return f"cannot write {where}: {reason}{f' ({name})' if name else ''}; {fix}"
