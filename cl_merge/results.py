"""The results JSON: one file per run, schema versioned, written atomically.

The stable top-level keys (docs/results-schema.md) are promises to users' tooling: add keys, never rename them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List

import torch

from .errors import UserError

SCHEMA_VERSION = 1
STABLE_KEYS = (
    "schema_version", "benchmark", "tasks", "order", "seed", "strategy", "learner", "merger",
    "protocol", "hyperparameters", "acc_matrix", "expert_acc", "acc", "bwt", "bwt_denominator",
    "fwt", "normalized_acc", "sar", "timings", "peak_memory_bytes", "environment", "git_commit",
)
# keys that differ between two runs of the same config + seed
# expert_source depends on what the cache already held (provenance, not a result)
# command_line: how this process was started; independent_expert_acc / normalized_acc_independent of a
# sequential run: present only when the expert cache already held the independent experts
VOLATILE_KEYS = ("timings", "peak_memory_bytes", "environment", "git_commit", "created", "expert_source",
                 "command_line", "independent_expert_acc", "normalized_acc_independent")
MARKER = ".cl_merge"

_PACKAGES = ("cl_merge", "torch", "torchvision", "open_clip_torch", "avalanche-lib", "datasets", "numpy",
             "scipy", "safetensors", "transformers",
             # the scorers behind TRACE and MergeBench numbers (null where not installed)
             "lm-eval", "rouge", "rouge-score", "rapidfuzz", "fuzzywuzzy", "evalplus")


def environment(device: str) -> Dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def git_commit() -> Any:
    """The commit of the cl_merge checkout the code runs from (null for a non-git install)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def check_results_dir(path: Path) -> None:
    """The checks of ``ensure_results_dir``, creating nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a directory; choose a directory")
    if path.exists() and not (path / MARKER).exists() and any(path.iterdir()):
        raise UserError(f"--out {path} is not a cl_merge results directory (no {MARKER} marker and not "
                        "empty); choose a new or empty directory")
    for parent in path.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {path}: {parent} is a file, not a directory; choose another location")
            break


def ensure_results_dir(path: Path) -> None:
    """Create ``path`` or accept it when it is ours (marker) or empty; refuse anybody else's directory."""
    path = Path(path)
    check_results_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.exists():
        marker.write_text("cl_merge results directory\n")


def load_result(path: os.PathLike) -> Dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"result file {path} is unreadable or corrupt ({exc.__class__.__name__}); "
                        "delete it and rerun that run") from None
    if not isinstance(data, dict):
        raise UserError(f"result file {path} is not a cl_merge result (not a JSON object)")
    missing = [k for k in STABLE_KEYS if k not in data]
    if missing:
        raise UserError(f"result file {path} is not a cl_merge result (missing {', '.join(missing[:4])})")
    if data["schema_version"] > SCHEMA_VERSION:
        raise UserError(f"result file {path} has schema {data['schema_version']}; upgrade cl_merge to read it")
    return data


def find_results(paths: List[os.PathLike]) -> List[Path]:
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # hidden folders below the root (.cache, run.log's .tracking) hold no results of their own
            files.extend(sorted(q for q in p.rglob("*.json") if not q.name.startswith(".")
                                and ".cache" not in q.parts and not q.parent.name.endswith(".ckpt")
                                and not any(part.startswith(".") for part in q.relative_to(p).parts)))
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"no such result file or directory: {p}")
    return files


def strip_volatile(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in result.items() if k not in VOLATILE_KEYS}
