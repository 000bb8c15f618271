"""Tabulate result files: a rich table on the terminal, Markdown and CSV for papers and tooling."""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, List, Optional, Sequence

from rich.table import Table

COLUMNS = [
    ("strategy", "strategy"), ("protocol", "protocol"), ("benchmark", "benchmark"), ("T", "T"),
    ("order", "order"), ("seed", "seed"), ("ACC", "acc"), ("BWT", "bwt"), ("FWT", "fwt"),
    ("norm. ACC", "normalized_acc"), ("SAR", "sar"), ("wall s", "wall_s"),
]
_PERCENT = {"acc", "bwt", "fwt", "normalized_acc"}
_METRICS = _PERCENT | {"sar"}
SCOPE_TEXT = {"seen_tasks": "mean over the seen tasks", "current_task": "current task only"}


def scope_note(table_rows: List[Dict[str, Any]]) -> str:
    """The SAR scope(s) of the rows, in words (every table names the scope it shows)."""
    scopes = sorted({str(r.get("sar_scope")) for r in table_rows if r.get("sar") is not None})
    if not scopes:
        return "SAR not recorded"
    return "SAR: " + "; ".join(SCOPE_TEXT.get(s, s) for s in scopes) + (" (mixed scopes)" if len(scopes) > 1 else "")


def rows(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for r in results:
        out.append({
            "strategy": r["strategy"], "protocol": r["protocol"], "benchmark": r["benchmark"],
            "T": len(r["tasks"]), "order": r["order"], "seed": r["seed"], "acc": r["acc"], "bwt": r["bwt"],
            "fwt": r["fwt"], "normalized_acc": r["normalized_acc"],
            "sar": (r.get("sar") or [None])[-1],  # after the final step
            "sar_scope": r.get("sar_scope"),  # seen_tasks (mean over seen tasks) or current_task
            "wall_s": (r.get("timings") or {}).get("wall_s"),
            "diverged": bool(r.get("diverged")),
        })
    return sorted(out, key=lambda x: (x["benchmark"], x["T"], -(x["acc"] or 0.0), str(x["strategy"])))


def cell(row: Dict[str, Any], key: str) -> str:
    """A table cell; a diverged run's metrics read "diverged", never a number."""
    if row.get("diverged") and key in _METRICS:
        return "diverged"
    return fmt(key, row[key])


def fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in _PERCENT:
        return f"{100 * value:.1f}"
    if key == "wall_s":
        return f"{value:.1f}"
    if key == "sar":
        return f"{value:.3f}"
    return str(value)


def rich_table(table_rows: List[Dict[str, Any]], title: str = "cl_merge results (ACC/BWT/FWT in %)") -> Table:
    table = Table(title=f"{title}; {scope_note(table_rows)}")
    for header, key in COLUMNS:
        table.add_column(header, justify="right" if key in _PERCENT or key in {"T", "wall_s", "seed", "sar"} else "left")
    for row in table_rows:
        table.add_row(*(cell(row, key) for _, key in COLUMNS))
    return table


def markdown(table_rows: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |",
             "|" + "|".join("---:" if k in _PERCENT or k in {"T", "wall_s", "seed", "sar"} else "---" for _, k in COLUMNS) + "|"]
    for row in table_rows:
        lines.append("| " + " | ".join(cell(row, k) for _, k in COLUMNS) + " |")
    return "\n".join(lines) + ("\n\nACC, BWT (denominator T−1), FWT and normalized ACC in %; SAR (subspace alignment "
                                "ratio) after the final step, in [0, 1]; " + scope_note(table_rows) + ".\n")


def csv_text(table_rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[k for _, k in COLUMNS] + ["sar_scope", "diverged"])
    writer.writeheader()
    for row in table_rows:
        writer.writerow({k: ("diverged" if row.get("diverged") and k in _METRICS else v) for k, v in row.items()})
    return buf.getvalue()


def matrix_table(result: Dict[str, Any], title: Optional[str] = None) -> Table:
    """The accuracy matrix of one run: rows = after step t (0 = pre-trained), columns = tasks."""
    table = Table(title=title or f"accuracy matrix (%) — {result['strategy']}")
    table.add_column("after")
    for name in result["tasks"]:
        table.add_column(name[:10], justify="right")
    labels = ["θ0"] + [f"{t}: {n[:10]}" for t, n in enumerate(result["tasks"], start=1)]
    if result.get("protocol") == "multitask":  # two rows: θ0 and the one merge of every expert
        labels = ["θ0", "merged"]
    for label, row in zip(labels, result["acc_matrix"]):
        table.add_row(label, *("·" if v is None else f"{100 * v:.0f}" for v in row))
    table.add_row("expert", *(f"{100 * v:.0f}" for v in result["expert_acc"]))
    return table
