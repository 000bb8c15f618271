"""Tabulate result files: a rich table on the terminal, Markdown and CSV for papers and tooling."""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, List, Optional, Sequence

from rich.table import Table

COLUMNS = [
    ("strategy", "strategy"), ("settings", "settings"), ("protocol", "protocol"), ("benchmark", "benchmark"),
    ("T", "T"), ("order", "order"), ("seed", "seed"), ("ACC", "acc"), ("BWT", "bwt"), ("FWT", "fwt"),
    ("norm. ACC", "normalized_acc"), ("SAR", "sar"), ("wall s", "wall_s"), ("train s", "train_s"),
]
NOTE = ("ACC, BWT (denominator T−1), FWT and normalized ACC in %; norm. ACC divides by the independent experts' "
        "accuracy (fine-tuned from θ0 on each task alone) for every strategy, – where unknown; SAR (subspace "
        "alignment ratio) after the final step, in [0, 1]; wall s includes train s, the seconds spent training "
        "experts (0 when the expert cache held them); settings: the hyperparameters that tell same-named runs "
        "apart; ")
_PERCENT = {"acc", "bwt", "fwt", "normalized_acc", "normalized_acc_own"}
_METRICS = _PERCENT | {"sar"}
SCOPE_TEXT = {"seen_tasks": "mean over the seen tasks", "current_task": "current task only"}


def scope_note(table_rows: List[Dict[str, Any]]) -> str:
    """The SAR scope(s) of the rows, in words (every table names the scope it shows)."""
    scopes = sorted({str(r.get("sar_scope")) for r in table_rows if r.get("sar") is not None})
    if not scopes:
        return "SAR not recorded"
    return "SAR: " + "; ".join(SCOPE_TEXT.get(s, s) for s in scopes) + (" (mixed scopes)" if len(scopes) > 1 else "")


def rows(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = unsorted_rows(results)
    return sorted(out, key=lambda x: (x["benchmark"], x["T"], -(x["acc"] or 0.0), str(x["strategy"]), x["settings"]))


def unsorted_rows(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One table row per result, in the results' order: normalized ACC over the independent experts
    found among ``results``, settings that tell a run apart from the other runs of its strategy."""
    from .normalization import independent_experts, independent_normalized_acc

    experts = independent_experts(results)
    settings = distinguishing_settings(results)
    out = []
    for r, distinct in zip(results, settings):
        timings = r.get("timings") or {}
        out.append({
            "strategy": r["strategy"], "settings": distinct, "protocol": r["protocol"], "benchmark": r["benchmark"],
            "T": len(r["tasks"]), "order": r["order"], "seed": r["seed"], "acc": r["acc"], "bwt": r["bwt"],
            "fwt": r["fwt"],
            # one denominator for every strategy: the independent experts (cl_merge.normalization)
            "normalized_acc": independent_normalized_acc(r, experts),
            "normalized_acc_own": r["normalized_acc"],
            "sar": (r.get("sar") or [None])[-1],  # after the final step
            "sar_scope": r.get("sar_scope"),  # seen_tasks (mean over seen tasks) or current_task
            "wall_s": timings.get("wall_s"), "train_s": timings.get("train_s"),
            "cache_read_s": timings.get("cache_read_s"),
            "diverged": bool(r.get("diverged")),
        })
    return out


def _settings_of(result: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in (result.get("hyperparameters") or {}).items() if k != "benchmark.num_tasks"}
    out.update({f"run.{k}": v for k, v in (result.get("run_settings") or {}).items()})
    return out


def distinguishing_settings(results: Sequence[Dict[str, Any]]) -> List[str]:
    """Per result, the settings in which it differs from other runs of the same strategy, protocol,
    benchmark and T ("" when none): two c-ta runs differing only in lr read "learner.lr=…"."""
    from .grid.aggregate import describe_differences

    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["benchmark"], r["strategy"], r["protocol"], len(r["tasks"])), []).append(_settings_of(r))
    out = []
    for r in results:
        mine, peers = _settings_of(r), groups[(r["benchmark"], r["strategy"], r["protocol"], len(r["tasks"]))]
        out.append(describe_differences(mine, peers))
    return out


def columns_of(table_rows: List[Dict[str, Any]]):
    """The table's columns: "settings" only when some runs need it to be told apart, "train s" only when
    recorded."""
    keep_settings = any(r.get("settings") for r in table_rows)
    keep_train = any(r.get("train_s") is not None for r in table_rows)
    return [(h, k) for h, k in COLUMNS if (k != "settings" or keep_settings) and (k != "train_s" or keep_train)]


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
    if key in ("wall_s", "train_s", "cache_read_s"):
        return f"{value:.1f}"
    if key == "sar":
        return f"{value:.3f}"
    return str(value)


def rich_table(table_rows: List[Dict[str, Any]], title: str = "cl_merge results (ACC/BWT/FWT in %)") -> Table:
    table = Table(title=f"{title}; {scope_note(table_rows)}")
    columns = columns_of(table_rows)
    for header, key in columns:  # fold, never cut: a cell is shown whole at any width
        table.add_column(header, overflow="fold",
                         justify="right" if key in _PERCENT or key in {"T", "wall_s", "seed", "sar"} else "left")
    for row in table_rows:
        table.add_row(*(cell(row, key) for _, key in columns))
    return table


def markdown(table_rows: List[Dict[str, Any]]) -> str:
    columns = columns_of(table_rows)
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---:" if k in _PERCENT or k in {"T", "wall_s", "seed", "sar"} else "---" for _, k in columns) + "|"]
    for row in table_rows:
        lines.append("| " + " | ".join(cell(row, k) for _, k in columns) + " |")
    return "\n".join(lines) + ("\n\n" + NOTE + scope_note(table_rows) + ".\n")


def csv_text(table_rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[k for _, k in COLUMNS] + ["normalized_acc_own", "train_s",
                                                                         "cache_read_s", "sar_scope", "diverged"])
    writer.writeheader()
    for row in table_rows:
        writer.writerow({k: ("diverged" if row.get("diverged") and k in _METRICS else v) for k, v in row.items()})
    return buf.getvalue()


def matrix_table(result: Dict[str, Any], title: Optional[str] = None) -> Table:
    """The accuracy matrix of one run: rows = after step t (0 = pre-trained), columns = tasks.

    Task names are never cut: in a log they take their width, on a narrow terminal they fold onto
    more lines (whole names, no ellipsis)."""
    table = Table(title=title or f"accuracy matrix (%) — {result['strategy']}")
    table.add_column("after", overflow="fold")
    for name in result["tasks"]:
        table.add_column(name, justify="right", overflow="fold")
    labels = ["θ0"] + [f"{t}: {n}" for t, n in enumerate(result["tasks"], start=1)]
    if result.get("protocol") == "multitask":  # two rows: θ0 and the one merge of every expert
        labels = ["θ0", "merged"]
    for label, row in zip(labels, result["acc_matrix"]):
        table.add_row(label, *("·" if v is None else f"{100 * v:.0f}" for v in row))
    table.add_row("expert", *(f"{100 * v:.0f}" for v in result["expert_acc"]))
    return table
