"""Published experts as files: ``DIR/<task name>.safetensors`` holding one task's fine-tuned open_clip
image tower (``convert_hf_clip`` writes FusionBench's in this form). ``load_expert`` returns it as the
adapter's mergeable state, checked against θ0's names and shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping

import torch

from cl_merge.errors import UserError

from .convert_hf_clip import check_against


def expert_file(directory: Path, task: str) -> Path:
    return Path(directory).expanduser() / f"{task}.safetensors"


def load_expert(directory: Path, task: str, reference: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The expert of ``task`` from ``directory`` with ``reference``'s keys, dtypes and devices."""
    path = expert_file(directory, task)
    if not path.is_file():
        raise UserError(f"no expert for task {task}: {path} does not exist (convert FusionBench's with "
                        f"python -m cl_merge.benchmarks.vision20.convert_hf_clip --out {Path(directory)})")
    from safetensors.torch import load_file

    state = load_file(str(path))
    check_against(state, reference, f"expert {path}")
    return {k: state[k].to(dtype=ref.dtype, device=ref.device) for k, ref in reference.items()}
