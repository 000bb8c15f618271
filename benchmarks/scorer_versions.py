"""Versions of the scoring packages a run used, for its results (None: not installed)."""

from __future__ import annotations

from importlib import metadata
from typing import Dict, Optional, Sequence

# distribution names (what pip installs) of every package a TRACE or MergeBench score can depend on
SCORER_PACKAGES = ("rouge", "rouge-score", "fuzzywuzzy", "python-Levenshtein", "rapidfuzz", "sacrebleu",
                   "lm_eval", "evalplus", "transformers")


def package_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def scorer_versions(packages: Sequence[str] = SCORER_PACKAGES) -> Dict[str, Optional[str]]:
    return {name: package_version(name) for name in packages}
