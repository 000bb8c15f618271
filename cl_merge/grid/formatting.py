"""Leaderboard rows as text: the rich table on the terminal, Markdown (with footnotes and the
per-order table) and CSV (metrics as fractions, like the results JSON)."""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .aggregate import Row, mean_std, order_key
from .reference import REFERENCE_BENCHMARKS, backbone_of, match_reference

def reference_notes(rows: Sequence[Row], reference: List[Dict[str, Any]]) -> List[str]:
    """Per (backbone, T): the paper's pre-trained / fine-tuned rows beside our zero-shot / expert means."""
    notes, done = [], set()
    for row in rows:
        backbone = backbone_of(row.model)
        key = (backbone, row.T)
        if backbone is None or key in done:
            continue
        done.add(key)
        pre = match_reference(reference, row.model, "pretrained", row.T)
        ft = match_reference(reference, row.model, "finetuned", row.T)
        same = [r for r in rows if backbone_of(r.model) == backbone and r.T == row.T]
        zs = mean_std([r.stats["zero_shot"][0] for r in same])[0]
        ex = mean_std([r.stats["expert"][0] for r in same])[0]
        if pre or ft:
            notes.append(f"{backbone}, T={row.T}: paper pre-trained {_ref(pre, 'acc')} / fine-tuned {_ref(ft, 'acc')}; "
                         f"ours zero-shot {_pct(zs)} / experts {_pct(ex)}")
    return notes




def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _pm(stat: Tuple[Optional[float], Optional[float], int], percent: bool = True) -> str:
    mean, std, _ = stat
    if mean is None:
        return "–"
    if percent:
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def _ref(rec: Optional[Dict[str, Any]], metric: str) -> str:
    if not rec or rec.get(f"{metric}_mean") is None:
        return "–"
    std = rec.get(f"{metric}_std")
    return f"{rec[f'{metric}_mean']:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def all_orders(rows: Sequence[Row]) -> List[Any]:
    return sorted({o for r in rows for o in r.per_order}, key=order_key)


def with_reference(rows: Sequence[Row]) -> bool:
    return any(r.benchmark in REFERENCE_BENCHMARKS for r in rows)


def table_columns(rows: Sequence[Row]) -> List[str]:
    cols = ["strategy", "protocol", "T", "n", "ACC", "BWT", "SAR", "norm. ACC", "worst order (ACC)"]
    cols += [f"ACC o{o}" for o in all_orders(rows)]
    if with_reference(rows):
        cols += ["paper ACC", "paper BWT"]
    return cols


def table_cells(row: Row, orders: Sequence[Any], reference: bool) -> List[str]:
    if row.worst_order is not None:
        worst = f"{row.worst_order} ({_pct(row.per_order[row.worst_order]['acc'])})"
    else:
        worst = "all equal" if len(row.per_order) > 1 else "–"
    if row.diverged:  # never a number for a row with a diverged run
        mark = f"diverged ({row.diverged}/{row.n})"
        cells = [row.name, row.protocol, str(row.T), str(row.n), mark, mark, mark, mark, "–"]
    else:
        cells = [row.name, row.protocol, str(row.T), str(row.n), _pm(row.stats["acc"]), _pm(row.stats["bwt"]),
                 _pm(row.stats["sar"], percent=False), _pm(row.stats["normalized_acc"]), worst]
    cells += [(_order_cell(row.per_order[o])) if o in row.per_order else "" for o in orders]
    if reference:
        cells += [_ref(row.reference, "acc"), _ref(row.reference, "bwt")]
    return cells


def _order_cell(vals: Dict[str, Any]) -> str:
    return "diverged" if vals.get("diverged") else _pct(vals["acc"])


def bound_rows(rows: Sequence[Row], width: int) -> List[List[str]]:
    """Multitask tables: the zero-shot model (row 0 of every result) and the experts on their own
    tasks (``expert_acc``), per T, as the multi-task merging papers print them; [] otherwise."""
    out = []
    for T in sorted({r.T for r in rows if r.protocol == "multitask"}):
        same = [r for r in rows if r.protocol == "multitask" and r.T == T and not r.diverged]
        for label, key, norm in (("zero-shot (θ0)", "zero_shot", None), ("experts", "expert", 1.0)):
            mean = mean_std([r.stats[key][0] for r in same])[0]
            cells = [label, "–", str(T), "–", _pct(mean), "–", "–", _pct(norm), "–"]
            out.append(cells + [""] * (width - len(cells)))
    return out


def title_of(rows: Sequence[Row], title: Optional[str] = None) -> str:
    benches = sorted({r.benchmark for r in rows})
    models = sorted({str(r.model) for r in rows if r.model})
    base = title or f"leaderboard: {', '.join(benches)}"
    return base + (f" ({', '.join(models)})" if models else "")


def rich_table(rows: Sequence[Row], title: Optional[str] = None):
    from rich.table import Table

    orders, ref = all_orders(rows), with_reference(rows)
    table = Table(title=f"{title_of(rows, title)} — mean ± sample std over orders; ACC/BWT in %, SAR in [0, 1]")
    for col in table_columns(rows):  # fold, never cut: every number and name is shown whole at any width
        table.add_column(col, justify="left" if col in ("strategy", "protocol") else "right", overflow="fold")
    for row in rows:
        table.add_row(*table_cells(row, orders, ref))
    return table


def footnotes(rows: Sequence[Row]) -> List[str]:
    scopes = sorted({r.sar_scope for r in rows if r.sar_scope})
    scope_text = {"seen_tasks": "mean over all tasks seen so far (run.sar_store=true)",
                  "current_task": "the last task's own update only (run.sar_store=false)",
                  "all_tasks": "mean over every task's own update against the one merged model (multitask protocol)",
                  "mixed": "mixed scopes within a row"}
    energy = sorted({str(run.get("sar_energy")) for r in rows for run in r.runs if run.get("sar_energy") is not None})
    multitask = {r.protocol == "multitask" for r in rows}
    if multitask == {True}:  # no model is deployed between tasks: BWT is null (docs/metrics.md)
        first = "ACC and normalized ACC in % (BWT is null under the multitask protocol)"
    elif True in multitask:
        first = "ACC, BWT (denominator T−1; null for multitask rows) and normalized ACC in %"
    else:
        first = "ACC, BWT (denominator T−1) and normalized ACC in %"
    notes = [first + "; mean ± sample standard deviation (n − 1) over "
             "the n runs of a row (task orders × seeds); per-order columns average over seeds.",
             "norm. ACC: final accuracy ÷ the independent experts' accuracy (each fine-tuned from θ0 on its task "
             "alone), the same denominator for every strategy; – where no run of the set trained those experts "
             "(the CSV's normalized_acc_own_* divide by each run's own experts).",
             "worst order: the order with the lowest ACC (\"all equal\" when every order gives the same ACC)."]
    if scopes:
        notes.append(f"SAR: subspace alignment ratio after the final step, per 2-D layer of the merged model at "
                     f"{'/'.join(energy) or '0.95'} retained energy, averaged over layers then tasks; "
                     + "; ".join(f"{s}: {scope_text.get(s, s)}" for s in scopes) + ".")
    else:
        notes.append("SAR: not recorded.")
    if with_reference(rows):
        notes.append("paper: SAIM paper Table 1 (mean ± std over its five task orders), same backbone and T.")
    return notes


def markdown(rows: Sequence[Row], title: Optional[str] = None,
             reference: Optional[List[Dict[str, Any]]] = None, shared: Optional[Sequence[str]] = None) -> str:
    orders, ref = all_orders(rows), with_reference(rows)
    cols = table_columns(rows)
    lines = [f"# {title_of(rows, title)}", "",
             "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if c in ("strategy", "protocol") else "---:" for c in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(table_cells(row, orders, ref)) + " |")
    lines += ["| " + " | ".join(cells) + " |" for cells in bound_rows(rows, len(cols))]
    lines.append("")
    lines += [f"- {n}" for n in footnotes(rows)]
    if shared is not None:
        lines.append(f"- {shared_settings_note(shared)}")
    if ref and reference:
        lines += [f"- {n}" for n in reference_notes(rows, reference)]
    lines += ["", "## Per-order values", "",
              "| strategy | protocol | T | order | seeds | ACC | BWT | SAR | norm. ACC |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for order, vals in row.per_order.items():
            seeds = len([r for r in row.runs if r["order"] == order])
            if vals.get("diverged"):
                lines.append(f"| {row.name} | {row.protocol} | {row.T} | {order} | {seeds} | diverged | diverged | "
                             "diverged | diverged |")
                continue
            sar = "–" if vals["sar"] is None else f"{vals['sar']:.3f}"
            lines.append(f"| {row.name} | {row.protocol} | {row.T} | {order} | {seeds} | {_pct(vals['acc'])} | "
                         f"{_pct(vals['bwt'])} | {sar} | {_pct(vals['normalized_acc'])} |")
    return "\n".join(lines) + "\n"


def shared_settings_note(overrides: Sequence[str]) -> str:
    """The grid's overrides applied to every run, in words (leaderboards name what all their runs share)."""
    return "settings shared by every run: " + (" ".join(overrides) if overrides else "none (defaults)") + "."


def csv_text(rows: Sequence[Row], shared: Optional[Sequence[str]] = None) -> str:
    """One line per row; metrics as fractions in [0, 1] like the results JSON (paper columns too);
    ``shared``: the grid's overrides of every run (column ``shared_overrides``)."""
    orders = all_orders(rows)
    fields = ["benchmark", "model", "strategy", "variant", "protocol", "T", "n", "diverged", "orders", "sar_scope"]
    for m in ("acc", "bwt", "sar", "normalized_acc"):
        fields += [f"{m}_mean", f"{m}_std"]
    fields += ["worst_order", "worst_order_acc"]
    for m in ("acc", "bwt", "sar", "normalized_acc"):
        fields += [f"{m}_order_{o}" for o in orders]
    fields += ["paper_acc_mean", "paper_acc_std", "paper_bwt_mean", "paper_bwt_std"]
    fields += ["normalized_acc_own_mean", "normalized_acc_own_std", "shared_overrides"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        rec: Dict[str, Any] = {"benchmark": row.benchmark, "model": row.model, "strategy": row.strategy,
                               "variant": row.variant, "protocol": row.protocol, "T": row.T, "n": row.n,
                               "diverged": row.diverged, "orders": " ".join(map(str, row.per_order)), "sar_scope": row.sar_scope,
                               "worst_order": row.worst_order,
                               "worst_order_acc": row.per_order[row.worst_order]["acc"] if row.worst_order is not None else None}
        for m in ("acc", "bwt", "sar", "normalized_acc"):
            rec[f"{m}_mean"], rec[f"{m}_std"], _ = row.stats[m]
            for o in orders:
                vals = row.per_order.get(o, {})
                rec[f"{m}_order_{o}"] = "diverged" if vals.get("diverged") else vals.get(m)
        rec["normalized_acc_own_mean"], rec["normalized_acc_own_std"], _ = row.stats.get("normalized_acc_own",
                                                                                      (None, None, 0))
        rec["shared_overrides"] = " ".join(shared) if shared else None
        if row.reference:
            for k in ("acc_mean", "acc_std", "bwt_mean", "bwt_std"):
                v = row.reference.get(k)
                rec[f"paper_{k}"] = None if v is None else v / 100.0
        writer.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()})
    return buf.getvalue()
