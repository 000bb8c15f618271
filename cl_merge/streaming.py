"""Tensor-by-tensor safetensors IO: the files behind the on-disk parameter store (``cl_merge.store``),
for models too large to hold several copies of (MergeBench's 3B-9B LLMs).

* ``TensorSource``: a read-only, lazy ``name -> tensor`` mapping over safetensors files (one file, or
  a Hugging Face checkpoint folder with ``model.safetensors.index.json`` shards). A tensor is read
  (``safe_open(...).get_tensor``) only when it is looked up and is not cached, so holding a source
  costs no tensor memory.
* ``TensorWriter``: writes a safetensors file one tensor at a time (``add`` in any order), so a merged
  model never has to exist in memory as a whole. With a known layout (names, dtypes, shapes, e.g. the
  merged parameters) the header is written first and tensors go straight to their offsets; otherwise
  the data is spooled to a side file and the header is prepended on ``close`` (one extra sequential
  copy).
* ``LiveTensors``: counts the bytes of tensors handed out by sources that are still referenced (a
  weakref finalizer per tensor) and keeps the peak: the tests use it to show that a merge step holds
  far less than base + previous + expert.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import weakref
from pathlib import Path
from typing import Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import torch

from .errors import UserError
from .io import DamagedFile, temp_path

# safetensors dtype names <-> torch dtypes (the ones checkpoints use)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class LiveTensors:
    """Bytes of source tensors currently alive (not yet garbage-collected), and their peak."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.loads = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            self.current += size
            self.loads += 1
            self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._release, size)
        return tensor

    def _release(self, size: int) -> None:
        with self._lock:
            self.current -= size

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.current


#: metadata key of the per-tensor content hashes a TensorWriter records (JSON: name -> sha256 hex)
TENSOR_HASH_KEY = "cl_merge.tensor_sha256"
_NO_HASH = "0" * 64  # placeholder of the same length, while a header written first awaits its hashes


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 over one tensor's name, dtype, shape and bytes (as ``io.content_hash`` hashes each)."""
    import hashlib

    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def checkpoint_files(path: Path) -> Dict[str, Path]:
    """``name -> file`` for a safetensors file or a checkpoint folder (sharded or not)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path} is not a .safetensors file")
        return {name: path for name in _header(path)}
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a safetensors index ({exc.__class__.__name__})") from None
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        return {name: single for name in _header(single)}
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return {name: shard for shard in shards for name in _header(shard)}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise UserError(f"checkpoint {path} holds PyTorch pickles only; streaming needs safetensors (load it once "
                        "with transformers and save_pretrained(..., safe_serialization=True))")
    raise UserError(f"checkpoint {path} holds no .safetensors file")


def _header(path: Path) -> Dict[str, dict]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"cannot read safetensors header of {path} ({exc.__class__.__name__})") from None
    header.pop("__metadata__", None)
    return header


class TensorSource(Mapping):
    """Lazy ``name -> tensor`` over safetensors; ``names`` restricts (and orders) the keys.

    ``dtype``/``device`` convert on read. ``tracker`` counts the live bytes handed out."""

    def __init__(self, path: os.PathLike, names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                 device: str = "cpu", tracker: Optional[LiveTensors] = None, label: Optional[str] = None,
                 verify: Optional[bool] = None):
        """``verify``: check each tensor read against the content hash its writer recorded. None
        checks files that carry hashes (the harness's own); True also refuses a file without them."""
        self.path = Path(path)
        self.label = label or str(path)
        files = checkpoint_files(self.path)
        if names is not None:
            missing = [n for n in names if n not in files]
            if missing:
                raise UserError(f"{self.label} lacks {len(missing)} tensor(s) the model merges, e.g. "
                                f"{', '.join(missing[:3])}")
            files = {n: files[n] for n in names}
        self._files = files
        self.dtype = dtype
        self.device = device
        self.tracker = tracker
        self._handles: Dict[Path, object] = {}
        self._verify = verify
        self._digests: Dict[Path, Optional[Dict[str, str]]] = {}

    def _expected_digest(self, file: Path, name: str) -> Optional[str]:
        if self._verify is False:
            return None
        if file not in self._digests:
            meta = self._handle(file).metadata() or {}
            try:
                self._digests[file] = json.loads(meta[TENSOR_HASH_KEY]) if TENSOR_HASH_KEY in meta else None
            except ValueError:
                raise DamagedFile(file, "unreadable content hashes") from None
        digests = self._digests[file]
        if digests is None:
            if self._verify:
                raise DamagedFile(file, "no content hash")
            return None
        if name not in digests:
            raise DamagedFile(file, f"no content hash for {name}")
        return digests[name]

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(file), framework="pt", device="cpu")
            self._handles[file] = handle
        return handle

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._files[name]
        tensor = self._handle(file).get_tensor(name)
        expected = self._expected_digest(file, name)
        if expected is not None and tensor_digest(name, tensor) != expected:
            raise DamagedFile(file, f"content hash mismatch in {name}")
        if self.dtype is not None or self.device != "cpu":
            tensor = tensor.to(device=self.device, dtype=self.dtype or tensor.dtype)
        return self.tracker.track(tensor) if self.tracker is not None else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's default would)
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def spec(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        """(stored dtype, shape) without reading the data."""
        sl = self._handle(self._files[name]).get_slice(name)
        return _DTYPES[sl.get_dtype()], tuple(sl.get_shape())

    def close(self) -> None:
        self._handles.clear()


class TensorWriter:
    """Write a safetensors file tensor by tensor (see the module docstring). Use as a context
    manager; the file appears (atomically, via ``os.replace``) only when every tensor was written."""

    def __init__(self, path: os.PathLike, layout: Optional[Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]] = None,
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)  # swept at the next run's start if this process dies
        self._metadata = metadata or {}
        self._entries: Dict[str, dict] = {}
        self._written: set = set()
        self._layout = layout
        self._digests: Dict[str, str] = {}
        if layout is not None:
            self._digests = {name: _NO_HASH for name in layout}  # the header's size is fixed now
            offset = 0
            for name, (dtype, shape) in layout.items():
                size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
                self._entries[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                                       "data_offsets": [offset, offset + size]}
                offset += size
            head = self._header_bytes()
            self._base = 8 + len(head)
            self._file = open(self._tmp, "wb")
            self._file.write(struct.pack("<Q", len(head)))
            self._file.write(head)
            self._file.truncate(self._base + offset)
        else:
            self._data_tmp = temp_path(self.path)
            self._file = open(self._data_tmp, "wb")
            self._offset = 0

    def _header_bytes(self) -> bytes:
        header = dict(self._entries)
        header["__metadata__"] = dict(self._metadata, **{TENSOR_HASH_KEY: json.dumps(self._digests, sort_keys=True)})
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * ((-len(raw)) % 8)  # 8-byte alignment, padded with spaces as the format allows

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        data = tensor.detach().to("cpu").contiguous()
        self._digests[name] = tensor_digest(name, data)
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        if self._layout is not None:
            entry = self._entries.get(name)
            if entry is None:
                raise ValueError(f"tensor {name} is not in the file's layout")
            if entry["dtype"] != _NAMES[data.dtype] or entry["shape"] != list(data.shape):
                raise ValueError(f"tensor {name}: {data.dtype} {tuple(data.shape)} differs from the layout "
                                 f"{entry['dtype']} {tuple(entry['shape'])}")
            self._file.seek(self._base + entry["data_offsets"][0])
            self._file.write(raw)
        else:
            size = data.numel() * data.element_size()
            self._entries[name] = {"dtype": _NAMES[data.dtype], "shape": list(data.shape),
                                   "data_offsets": [self._offset, self._offset + size]}
            self._file.write(raw)
            self._offset += size
        self._written.add(name)

    def close(self) -> None:
        if self._layout is not None:
            missing = set(self._entries) - self._written
            if missing:
                self.abort()
                raise ValueError(f"{len(missing)} tensor(s) of {self.path.name} were never written, e.g. "
                                 f"{sorted(missing)[0]}")
            head = self._header_bytes()  # now with the hashes: same length as the placeholder header
            if 8 + len(head) != self._base:
                self.abort()
                raise ValueError(f"header of {self.path.name} changed size")
            self._file.seek(8)
            self._file.write(head)
            self._file.close()
        else:
            self._file.close()
            head = self._header_bytes()
            with open(self._tmp, "wb") as out, open(self._data_tmp, "rb") as data:
                out.write(struct.pack("<Q", len(head)))
                out.write(head)
                shutil.copyfileobj(data, out, 64 << 20)
            os.unlink(self._data_tmp)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            for p in (self._tmp, getattr(self, "_data_tmp", None)):
                if p is not None and Path(p).exists():
                    os.unlink(p)

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
