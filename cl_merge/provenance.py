"""What a results file records about how it was made: when (``created``), by which command
(``command_line``, ``rerun_command``) and which final weights (``weight_sha256``)."""

from __future__ import annotations

import datetime
import shlex
import sys
from typing import Any, Dict, List, Mapping

import torch

from .io import content_hash


def created() -> str:
    """Now, UTC, ISO 8601 with seconds (``2026-12-01T23:59:59Z``)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_line() -> str:
    """The command that started this process, shell-quoted."""
    return shlex.join(sys.argv) if sys.argv and sys.argv[0] else ""


def rerun_command(config) -> str:
    """A ``cl-merge run`` command that resolves to the same configuration (every resolved setting
    spelled out, so later changes of a default do not change what it runs)."""
    args: List[str] = ["cl-merge", "run", "--benchmark", config.benchmark]
    if config.strategy:
        args += ["--strategy", config.strategy]
    else:
        args += ["--learner", config.learner, "--merger", config.merger]
    args += ["--protocol", config.protocol, "--order", str(config.order), "--seed", str(config.seed)]
    from .config import STORAGE_SETTINGS

    settings: Dict[str, Any] = dict(config.hyperparameters())
    settings.update({f"run.{k}": v for k, v in config.run_params.items() if k not in STORAGE_SETTINGS})
    args += [f"{k}={_value(v)}" for k, v in settings.items() if v is not None]
    return shlex.join(args)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def weight_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the state's tensors in name order (name, dtype, shape, raw bytes): the content hash
    the project's tensor files carry (``io.content_hash``), so a saved copy of the same weights names
    the same hash. Two runs with the same hash deployed bit-identical weights."""
    return content_hash(dict(state))
