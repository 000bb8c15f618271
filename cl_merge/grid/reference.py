"""The SAIM paper's Table 1 (shipped as a CSV under results/reference/) and the match of a leaderboard
row to its line: same backbone, T and method (our strategy names mapped to the paper's)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import UserError

REFERENCE_TABLE = Path(__file__).resolve().parent.parent.parent / "results" / "reference" / "saim_table1_acc_bwt.csv"
REFERENCE_BENCHMARKS = {"vision20"}
# our strategy names -> the method names of the paper's Table 1
REFERENCE_ALIASES = {"magmax-ind": "magmax", "magmax_ind": "magmax", "c-magmax": "magmax", "c-opcm": "opcm",
                     "ties": "c-ties", "c_ties": "c-ties", "c_ta": "c-ta", "c_ft": "c-ft"}


def load_reference(path: Path = REFERENCE_TABLE) -> List[Dict[str, Any]]:
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    except OSError:
        raise UserError(f"reference table {path} is missing; pass --reference PATH to its CSV") from None
    out = []
    for rec in csv.DictReader(lines):
        try:
            out.append({"backbone": rec["backbone"], "tasks": int(rec["tasks"]), "method": rec["method"],
                        **{k: (float(rec[k]) if rec.get(k) not in (None, "") else None)
                           for k in ("acc_mean", "acc_std", "bwt_mean", "bwt_std")}})
        except (KeyError, ValueError) as exc:
            raise UserError(f"reference table {path} has a malformed row ({exc}); restore it from git") from None
    return out


def backbone_of(model: Optional[str]) -> Optional[str]:
    """'open_clip:ViT-B-32/openai' -> 'ViT-B/32'; HF 'clip-vit-base-patch32' -> 'ViT-B/32'."""
    if not model:
        return None
    m = re.search(r"ViT-([BLHg])-(\d+)", model, re.IGNORECASE)
    if m:
        return f"ViT-{m.group(1).upper()}/{m.group(2)}"
    m = re.search(r"vit-(base|large|huge)-patch(\d+)", model, re.IGNORECASE)
    if m:
        return f"ViT-{m.group(1)[0].upper()}/{m.group(2)}"
    return None


def match_reference(reference: List[Dict[str, Any]], model: Optional[str], strategy: str, T: int) -> Optional[Dict[str, Any]]:
    backbone = backbone_of(model)
    method = REFERENCE_ALIASES.get(strategy.lower(), strategy.lower())
    for rec in reference:
        if rec["backbone"] == backbone and rec["tasks"] == T and rec["method"] == method:
            return rec
    return None


