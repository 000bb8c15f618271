"""MergeBench's bases and experts: names, hub ids, and local folders.

Experts are published as ``MergeBench/{base}_{domain}`` (full fine-tunes of the base, safetensors).
Every checkpoint may instead be a local folder (``save_pretrained`` layout) or a single
``.safetensors`` file; hub ids resolve through the Hugging Face cache (``HF_HUB_OFFLINE=1``: cache only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Sequence

from cl_merge.errors import UserError

#: MergeBench's base models -> their hub ids
BASES: Dict[str, str] = {
    "Llama-3.2-3B": "meta-llama/Llama-3.2-3B",
    "Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-9b-it": "google/gemma-2-9b-it",
}
EXPERT_TEMPLATE = "MergeBench/{base}_{domain}"


def parse_pairs(items: Sequence[str], allowed: Sequence[str], key: str) -> Dict[str, str]:
    """``("math=/x", ...)`` -> {"math": "/x"}; names must be in ``allowed``."""
    out = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value:
            raise UserError(f"benchmark.{key}: '{item}' is not DOMAIN=PATH")
        if name not in allowed:
            raise UserError(f"benchmark.{key}: unknown domain '{name}'; known: {', '.join(allowed)}")
        out[name] = value
    return out


def is_local(ref: str) -> bool:
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~"))


_ALLOW = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.txt"]


def resolve(ref: str, what: str) -> Path:
    """A local folder/file for ``ref`` (a path, or a hub id fetched into / found in the HF cache)."""
    if is_local(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise UserError(f"{what}: {path} does not exist")
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a transformers dependency
        raise UserError("huggingface_hub is needed to fetch hub checkpoints") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(ref, allow_patterns=_ALLOW, local_files_only=offline))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("HF_HUB_OFFLINE=1 and it is not in the HF cache" if offline else
                "gated repositories (Llama, Gemma) need their license accepted and `huggingface-cli login`")
        raise UserError(f"{what}: cannot get '{ref}' from the Hugging Face Hub ({first}); {hint}; or give a "
                        "local folder") from None
