"""One look for every figure: a fixed colour and marker per strategy, the output formats, and the
file metadata that keeps a regenerated figure byte-identical.

Registered strategies have a fixed entry in ``STRATEGY_STYLES`` (the same colour and marker in the
curves, the HTML report and any later figure). Any other name (``adam+swa``, a strategy added by a
user) gets a style from its name's hash among ``len(PALETTE) × len(MARKERS)`` combinations;
``styles_for`` probes to the next free combination when two names of one figure collide, so up to
that many series never share colour and marker (colours and markers are also never combined with
the fixed entries' combinations).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, NamedTuple

from .errors import UserError

# Okabe–Ito (colour-blind safe) first, then the darker/lighter tab20 shades: 12 distinct colours.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#8C564B", "#7F7F7F", "#17BECF", "#BCBD22")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


class Style(NamedTuple):
    color: str
    marker: str

    def kwargs(self) -> Dict[str, str]:
        return {"color": self.color, "marker": self.marker}


# Fixed per registered strategy; families share a marker, members differ in colour.
STRATEGY_STYLES: Dict[str, Style] = {
    # sequential fine-tuning and continual-learning baselines: circles
    "c-ft": Style("#7F7F7F", "o"), "ewc": Style("#CC79A7", "o"), "er": Style("#000000", "o"),
    # continual merging: squares / triangles
    "c-ta": Style("#0072B2", "s"), "c-ties": Style("#009E73", "s"), "c-ties-fb": Style("#56B4E9", "s"),
    "magmax": Style("#E69F00", "s"), "swa": Style("#8C564B", "s"), "opcm": Style("#17BECF", "^"),
    "saim": Style("#D55E00", "D"),
    # multi-task (all experts at once): triangles down
    "ta": Style("#0072B2", "v"), "ties-m": Style("#009E73", "v"), "dare-ta": Style("#BCBD22", "v"),
    "fisher": Style("#CC79A7", "v"), "epimer": Style("#D55E00", "v"), "iso-c": Style("#E69F00", "v"),
    "iso-cts": Style("#8C564B", "v"), "tsv-m": Style("#17BECF", "v"),
    # their continual variants: plus signs, in the colour of the all-at-once method
    "c-iso-c": Style("#E69F00", "P"), "c-iso-cts": Style("#8C564B", "P"), "c-tsv-m": Style("#17BECF", "P"),
    "c-epimer": Style("#D55E00", "P"),
}
# the fallback space leaves out the fixed combinations, so a new name never looks like a registered one
_FREE = tuple(Style(c, m) for m in MARKERS for c in PALETTE if Style(c, m) not in set(STRATEGY_STYLES.values()))


def _slot(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % len(_FREE)


def style_of(name: str) -> Style:
    """The style of one series name (the strategy name, without a variant or protocol suffix)."""
    return STRATEGY_STYLES.get(name) or _FREE[_slot(name)]


def styles_for(names: Iterable[str]) -> Dict[str, Style]:
    """Styles for the series of one figure: the fixed ones, then hash slots probed past collisions
    (names taken in sorted order, so the result depends only on the set of names)."""
    names = sorted(set(names))
    out = {n: STRATEGY_STYLES[n] for n in names if n in STRATEGY_STYLES}
    used = set(out.values())
    for name in names:
        if name in out:
            continue
        slot = _slot(name)
        for k in range(len(_FREE)):
            candidate = _FREE[(slot + k) % len(_FREE)]
            if candidate not in used:
                break
        out[name] = candidate
        used.add(candidate)
    return out


# variants of one strategy (other hyperparameters, protocol, T) keep its colour and marker and
# differ in line style
LINESTYLES = ("-", "--", ":", "-.")

# ---- output formats ---------------------------------------------------------------------------------
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
PNG_DPI = 200  # raster output for slides and papers; PDF and SVG are vector


def format_of(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--out {path} must end in .png, .pdf or .svg (the format follows the extension)")
    return FORMATS[suffix]


def metadata(fmt: str, title: str, description: str) -> Dict[str, object]:
    """File metadata without dates or version strings: a regenerated figure is byte-identical."""
    if fmt == "png":
        return {"Title": title, "Description": description, "Software": "cl_merge"}
    if fmt == "pdf":
        return {"Title": title, "Subject": description, "Creator": "cl_merge", "Producer": "cl_merge",
                "CreationDate": None, "ModDate": None}
    return {"Title": title, "Description": description, "Creator": "cl_merge", "Date": None}


# rc settings every figure is drawn and saved under (svg.hashsalt fixes the SVG's element ids)
RC = {"svg.hashsalt": "cl_merge", "svg.fonttype": "path", "pdf.fonttype": 42, "font.size": 9,
      "axes.titlesize": 10, "legend.fontsize": 8, "legend.frameon": False}

BAND_ALPHA = 0.15  # shading of the ± std bands
