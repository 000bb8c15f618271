"""A self-contained HTML report of result files (``cl-merge report … --html FILE``): one file, no
network access (styles, the sorting script and the figures are inline), readable offline.

Sections: the leaderboard (mean ± std over task orders per strategy, protocol, T and variant), every
run (sortable: click a header; ``#sort=TABLE:KEY:asc|desc`` in the URL clicks that header on load, and
``window.clMergeSort(table, key, direction)`` sorts from a script), the ACC/SAR curves (inline SVG,
``cl_merge.plots.curves_figure``), and per run its accuracy matrix as a heatmap (an HTML table
coloured like the figures: viridis over 0–100%, the diagonal outlined, the experts' row last) with
its settings. Nothing in the file depends on when it was written: the same runs give the same bytes.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any, Dict, List, Optional, Sequence

from . import report
from .figure_style import styles_for

SCRIPT = r"""
(function () {
  function cellValue(td) {
    var v = td.getAttribute("data-value");
    if (v === null || v === "") return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function sortTable(tableId, key, direction) {
    var table = document.getElementById(tableId);
    if (!table) return false;
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var col = headers.findIndex(function (th) { return th.getAttribute("data-key") === key; });
    if (col < 0) return false;
    var sign = direction === "desc" ? -1 : 1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a.cells[col]), y = cellValue(b.cells[col]);
      if (x === null && y === null) return 0;
      if (x === null) return 1;  // missing values last in either direction
      if (y === null) return -1;
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      return x < y ? -sign : x > y ? sign : 0;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    headers.forEach(function (th) { th.removeAttribute("aria-sort"); });
    headers[col].setAttribute("aria-sort", direction === "desc" ? "descending" : "ascending");
    table.setAttribute("data-sorted", key + ":" + (direction === "desc" ? "desc" : "asc"));
    return true;
  }
  window.clMergeSort = sortTable;
  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
        th.addEventListener("click", function () {
          var now = th.getAttribute("aria-sort");
          sortTable(table.id, th.getAttribute("data-key"), now === "ascending" ? "desc" : "asc");
        });
      });
    });
    // #sort=TABLE:KEY:asc|desc sorts on load by clicking the header (once: ascending, twice: descending)
    var m = /^#sort=([\w-]+):([\w.-]+):(asc|desc)$/.exec(decodeURIComponent(location.hash));
    var th = m && document.querySelector("#" + m[1] + " thead th[data-key='" + m[2] + "']");
    if (th) { th.click(); if (m[3] === "desc") th.click(); }
  });
})();
"""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
table.heatmap td { width: 34px; text-align: center; border: 1px solid #fff; font-size: 12px; }
table.heatmap td.diag { outline: 2px solid #D55E00; outline-offset: -2px; }
table.heatmap tr.expert td { border-top: 3px solid #fff; }
table.heatmap th { background: none; position: static; font-weight: normal; font-size: 12px; }
table.heatmap thead th { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
details { margin: 6px 0; } summary { cursor: pointer; }
.settings td { text-align: left; font-size: 12px; }
.note { color: #555; font-size: 12px; }
figure { margin: 0; } figure svg { max-width: 100%; height: auto; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Optional[float]) -> str:
    return "" if value is None else repr(float(value))


def _td(text: str, value: Any = None, cls: str = "") -> str:
    attr = "" if value is None else f' data-value="{esc(value)}"'
    return f"<td{attr}{f' class={cls!r}' if cls else ''}>{text}</td>"


def _th(label: str, key: str, text: bool = False) -> str:
    return f'<th data-key="{esc(key)}"{" class=text" if text else ""}>{esc(label)}</th>'


def anchor(result: Dict[str, Any]) -> str:
    return "run-" + re.sub(r"[^A-Za-z0-9_.-]", "-", str(result.get("run_id") or id(result)))


# ---- leaderboard (aggregated over task orders) -----------------------------------------------------
def leaderboard_table(results: Sequence[Dict[str, Any]]) -> str:
    from .leaderboard import aggregate

    rows = aggregate(results)
    styles = styles_for(r.strategy for r in rows)
    cols = [("strategy", "strategy", True), ("protocol", "protocol", True), ("T", "T", False), ("runs", "n", False),
            ("ACC (%)", "acc", False), ("BWT (%)", "bwt", False), ("SAR", "sar", False),
            ("norm. ACC (%)", "normalized_acc", False)]
    out = ['<table id="leaderboard" class="sortable"><thead><tr>'
           + "".join(_th(label, key, text) for label, key, text in cols) + "</tr></thead><tbody>"]
    for row in rows:
        swatch = f'<span class="swatch" style="background:{styles[row.strategy].color}"></span>'
        cells = [_td(swatch + esc(row.name), row.name, "text"), _td(esc(row.protocol), row.protocol, "text"),
                 _td(str(row.T), row.T), _td(str(row.n), row.n)]
        for key in ("acc", "bwt", "sar", "normalized_acc"):
            mean, std, _ = row.stats[key]
            if row.diverged:
                cells.append(_td(f"diverged ({row.diverged}/{row.n})", ""))
                continue
            scale = 1.0 if key == "sar" else 100.0
            digits = 3 if key == "sar" else 1
            text = "–" if mean is None else f"{scale * mean:.{digits}f}" + (
                "" if std is None else f" ± {scale * std:.{digits}f}")
            cells.append(_td(text, _num(mean)))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# ---- every run ---------------------------------------------------------------------------------------
RUN_COLUMNS = [("strategy", "strategy", True), ("protocol", "protocol", True), ("benchmark", "benchmark", True),
               ("T", "T", False), ("order", "order", False), ("seed", "seed", False), ("ACC (%)", "acc", False),
               ("BWT (%)", "bwt", False), ("FWT (%)", "fwt", False), ("norm. ACC (%)", "normalized_acc", False),
               ("SAR", "sar", False), ("wall s", "wall_s", False)]


_METRIC_KEYS = {"acc", "bwt", "fwt", "normalized_acc", "sar"}


def runs_table(results: Sequence[Dict[str, Any]]) -> str:
    out = ['<table id="runs" class="sortable"><thead><tr>'
           + "".join(_th(label, key, text) for label, key, text in RUN_COLUMNS)
           + _th("variant", "variant", True) + "</tr></thead><tbody>"]
    table_rows = report.unsorted_rows(results)  # over every run: the independent experts, the settings
    ordered = sorted(zip(results, table_rows), key=lambda rr: (rr[0]["benchmark"], len(rr[0]["tasks"]),
                                                                -(rr[0].get("acc") or 0.0), str(rr[0]["strategy"]),
                                                                str(rr[0].get("run_id"))))
    for result, row in ordered:
        cells = []
        for _, key, text in RUN_COLUMNS:
            shown = report.cell(row, key)
            value = "" if row.get("diverged") and key in _METRIC_KEYS else row.get(key)
            if key == "strategy":
                shown = f'<a href="#{anchor(result)}">{esc(shown)}</a>'
            else:
                shown = esc(shown)
            cells.append(_td(shown, "" if value is None else value, "text" if text else ""))
        # the settings that tell this run apart from its strategy's other runs (as `report`'s column)
        cells.append(_td(esc(row["settings"]), row["settings"], "text"))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# ---- per-run heatmaps and settings -------------------------------------------------------------------
def _colour(v: float) -> str:
    import matplotlib
    from matplotlib.colors import to_hex

    return to_hex(matplotlib.colormaps["viridis"](v / 100.0))


def heatmap(result: Dict[str, Any]) -> str:
    from .plots import matrix_rows

    labels, data = matrix_rows(result)
    multitask = result.get("protocol") == "multitask"
    head = "<tr><th></th>" + "".join(f"<th>{esc(n)}</th>" for n in result["tasks"]) + "</tr>"
    body = []
    for i, (label, values) in enumerate(zip(labels, data)):
        cls = ' class="expert"' if i == len(labels) - 1 else ""
        cells = []
        for j, v in enumerate(values):
            if v != v:  # NaN: not evaluated
                cells.append('<td class="none">·</td>')
                continue
            diag = " diag" if (not multitask and 1 <= i < len(labels) - 1 and j == i - 1) else ""
            fg = "#000" if v > 60 else "#fff"
            cells.append(f'<td class="cell{diag}" style="background:{_colour(v)};color:{fg}" '
                         f'data-value="{v:.2f}">{v:.0f}</td>')
        body.append(f'<tr{cls}><th class="text">{esc(label)}</th>' + "".join(cells) + "</tr>")
    return (f'<table class="heatmap" data-run="{esc(result.get("run_id"))}"><thead>{head}</thead><tbody>'
            + "".join(body) + "</tbody></table>")


def settings_table(result: Dict[str, Any]) -> str:
    items: List[tuple] = [("run id", result.get("run_id")), ("model", result.get("model")),
                          ("learner", result.get("learner")), ("merger", result.get("merger")),
                          ("tasks", ", ".join(result["tasks"])), ("SAR scope", result.get("sar_scope")),
                          ("git commit", result.get("git_commit"))]
    items += sorted((k, v) for k, v in (result.get("hyperparameters") or {}).items())
    items += sorted((f"run.{k}", v) for k, v in (result.get("run_settings") or {}).items())
    timings = result.get("timings") or {}
    items += [(f"time {k}", f"{v:.1f} s") for k, v in timings.items() if isinstance(v, (int, float))]
    sources = result.get("expert_source") or []
    if sources:
        items.append(("experts", ", ".join(f"{s}×{sources.count(s)}" for s in sorted(set(map(str, sources))))))
    return '<table class="settings">' + "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(json.dumps(v) if isinstance(v, (list, dict)) else v)}</td></tr>"
        for k, v in items) + "</table>"


def run_section(result: Dict[str, Any]) -> str:
    from .plots import summary_text

    status = "diverged" if result.get("diverged") else summary_text(result)
    return (f'<details class="run" id="{anchor(result)}"><summary><b>{esc(result["strategy"])}</b> '
            f'({esc(result["protocol"])}), {esc(result["benchmark"])} order {esc(result["order"])}, seed '
            f'{esc(result["seed"])} — {esc(status)}</summary>{heatmap(result)}'
            f'<p class="note">rows: after learning task t (θ0 = pre-trained); outlined: each task right after it '
            f'was learned; last row: each expert on its own task. Accuracy in %.</p>'
            f'{settings_table(result)}</details>')


# ---- figure -------------------------------------------------------------------------------------------
def curves_svg(results: Sequence[Dict[str, Any]]) -> str:
    """The ACC/SAR curves figure as inline SVG (no XML prolog, so it sits in the HTML as an element)."""
    from . import plots

    kept = [r for r in results if not r.get("diverged")]
    if not kept:
        return '<p class="note">no run finished without diverging: no curves</p>'
    svg = plots.figure_bytes(plots.curves_figure(kept), "svg").decode("utf-8")
    svg = svg[svg.index("<svg"):]
    return f'<figure id="curves">{svg}</figure>'


SAR_SCOPES = {"seen_tasks": "mean over the seen tasks", "current_task": "current task only",
              "all_tasks": "multitask: mean over all tasks against the one merged model"}


def sar_scopes(results: Sequence[Dict[str, Any]]) -> str:
    scopes = sorted({str(r.get("sar_scope")) for r in results if (r.get("sar") or [None])[-1] is not None})
    return ("SAR: " + "; ".join(SAR_SCOPES.get(s, s) for s in scopes)) if scopes else "SAR not recorded"


def render(results: Sequence[Dict[str, Any]], title: str = "cl_merge report") -> str:
    ordered = sorted(results, key=lambda r: (r["benchmark"], str(r["strategy"]), r["protocol"], len(r["tasks"]),
                                             str(r["order"]), r["seed"], str(r.get("run_id"))))
    benches = ", ".join(sorted({r["benchmark"] for r in results}))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="note">{len(results)} runs on {esc(benches)}. ACC, BWT (denominator T−1), FWT and normalized '
        f"ACC in %; SAR (subspace alignment ratio) after the final step; {esc(sar_scopes(results))}. "
        "Click a column header to sort.</p>",
        "<h2>Leaderboard</h2>",
        '<p class="note">mean ± sample std over each group\'s runs (task orders × seeds).</p>',
        leaderboard_table(results),
        "<h2>ACC and SAR vs number of tasks</h2>", curves_svg(results),
        "<h2>Runs</h2>", runs_table(results),
        "<h2>Accuracy matrices</h2>", '<div id="matrices">', *[run_section(r) for r in ordered], "</div>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
