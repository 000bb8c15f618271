"""Per-step checkpoints: the resume point of a run.

Every tensor file carries a content hash (cl_merge.io) checked on load: a damaged checkpoint is
refused with one line, never resumed from.

Layout: ``<dir>/state.json`` (step, accuracy rows, timings, config fingerprint) and
``<dir>/step-<t>.safetensors`` (deployed weights, merger state, learner state). The tensors are
written first and state.json is replaced atomically last, so a run killed at any moment leaves
either the previous or the new checkpoint, never a mix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .errors import UserError
from .io import DamagedFile, load_tensors, save_tensors_atomic, write_json_atomic
from .params import StateDict

FORMAT = 1


class Checkpointer:
    def __init__(self, directory: Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def clear(self) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)

    def save(self, step: int, record: Dict[str, Any], tensors: Dict[str, StateDict]) -> None:
        flat = {f"{group}/{name}": t for group, state in tensors.items() for name, t in state.items()}
        tensor_file = f"step-{step}.safetensors"
        save_tensors_atomic(self.directory / tensor_file, flat)
        write_json_atomic(self.state_path, {"format": FORMAT, "fingerprint": self.fingerprint,
                                            "step": step, "tensor_file": tensor_file, "record": record})
        for old in self.directory.glob("step-*.safetensors"):
            if old.name != tensor_file:
                old.unlink()

    def load(self) -> Tuple[int, Dict[str, Any], Dict[str, StateDict]]:
        where = self.directory
        try:
            meta = json.loads(self.state_path.read_text())
            step, record, tensor_file = int(meta["step"]), meta["record"], meta["tensor_file"]
            fingerprint, fmt = meta["fingerprint"], meta["format"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"checkpoint {where} is corrupt ({exc.__class__.__name__}); delete it or run "
                            "without --resume") from None
        if fmt != FORMAT:
            raise UserError(f"checkpoint {where} has format {fmt}, this cl_merge writes {FORMAT}; delete "
                            "it or run without --resume")
        if fingerprint != self.fingerprint:
            raise UserError(f"checkpoint {where} belongs to a different configuration; delete it or run "
                            "without --resume")
        try:
            flat = load_tensors(self.directory / tensor_file)  # content hash checked
        except DamagedFile as exc:
            raise UserError(f"checkpoint {where} is refused ({tensor_file}: {exc.reason}); delete it or run "
                            "without --resume") from None
        except Exception as exc:
            raise UserError(f"checkpoint {where} is corrupt (cannot read {tensor_file}: "
                            f"{exc.__class__.__name__}); delete it or run without --resume") from None
        groups: Dict[str, StateDict] = {}
        for key, tensor in flat.items():
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name] = tensor
        return step, record, groups


def load_optional(checkpointer: Checkpointer, resume: bool) -> Optional[Tuple[int, Dict[str, Any], Dict[str, StateDict]]]:
    if not resume or not checkpointer.exists():
        return None
    return checkpointer.load()
