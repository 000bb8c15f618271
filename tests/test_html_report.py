"""`cl-merge report … --html FILE` in a real browser: headless Chromium loads the one-file report,
and the test reads the DOM it built (tables, heatmaps, sorting by clicking a header) and takes a
screenshot. Committed mini results, no training."""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from cl_merge.cli import main
from cl_merge.results import load_result

ROOT = Path(__file__).resolve().parents[1]
RUNS = [*sorted((ROOT / "results" / "mini" / "runs").glob("mini_c-ft_*.json")),
        *sorted((ROOT / "results" / "mini_multitask" / "runs").glob("mini_ta_multitask_*.json")),
        *sorted((ROOT / "results" / "mini_multitask" / "runs").glob("mini_ties-m_multitask_*.json"))]
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


class Tables(HTMLParser):
    """Rows (cell texts and data-value) of every <table id=...>, and the heatmap tables' run ids."""

    def __init__(self):
        super().__init__()
        self.tables, self.heatmaps, self.sorted = {}, [], {}
        self._table = self._row = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            if "heatmap" in (a.get("class") or ""):
                self.heatmaps.append(a.get("data-run"))
            if a.get("id"):
                self._table = a["id"]
                self.tables[self._table] = []
                self.sorted[self._table] = a.get("data-sorted")
        elif tag == "tbody" and self._table:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._row.append(a.get("data-value"))

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert main(["report", *map(str, RUNS), "--html", str(out)]) == 0
    return out


def chromium(tmp_path, *args):
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_file_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched from anywhere: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(http" not in text and "<link" not in text
    assert text.count('<table class="heatmap"') == len(RUNS)
    assert '<figure id="curves"><svg' in text  # the curves figure, inline


@pytest.mark.skipif(BROWSER is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_in_headless_chromium(page, tmp_path):
    url = page.resolve().as_uri()
    results = [load_result(p) for p in RUNS]
    # sorting by clicking a header (the page clicks the one named in the URL hash: once asc, twice desc)
    acc_col = 6  # strategy, protocol, benchmark, T, order, seed, ACC
    for direction in ("asc", "desc"):
        dom = Tables()
        dom.feed(chromium(tmp_path, "--dump-dom", f"{url}#sort=runs:acc:{direction}"))
        assert len(dom.tables["runs"]) == len(RUNS)
        assert len(dom.tables["leaderboard"]) == 1 + 2  # c-ft over 5 orders; ta and ties-m (one run each)
        assert sorted(dom.heatmaps) == sorted(r["run_id"] for r in results)
        accs = [float(row[acc_col]) for row in dom.tables["runs"]]
        assert accs == sorted(accs, reverse=direction == "desc") and len(set(accs)) > 1
        assert dom.sorted["runs"] == f"acc:{direction}"
    dom = Tables()
    dom.feed(chromium(tmp_path, "--dump-dom", f"{url}#sort=leaderboard:strategy:desc"))
    assert [row[0] for row in dom.tables["leaderboard"]] == ["ties-m", "ta", "c-ft"]

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # drawn content, not a blank page


def test_runs_table_normalizes_like_report_over_every_run():
    """A sequential run's norm. ACC divides by the independent experts found among all the report's
    runs (cl_merge.normalization), in the HTML runs table as in `report`'s table."""
    from cl_merge import html_report, report

    runs = [*sorted((ROOT / "results" / "mini" / "runs").glob("mini_c-ft_sequential_order1_*.json"))[:1],
            *sorted((ROOT / "results" / "mini" / "runs").glob("mini_c-ta_independent_order1_*.json"))[:1]]
    results = [load_result(p) for p in runs]
    expected = {r["strategy"]: r["normalized_acc"] for r in report.rows(results)}
    assert expected["c-ft"] is not None  # c-ta's independent experts are the denominator
    parser = Tables()
    parser.feed(html_report.runs_table(results))
    keys = [key for _, key, _ in html_report.RUN_COLUMNS]
    shown = {cells[keys.index("strategy")]: float(cells[keys.index("normalized_acc")])
             for cells in parser.tables["runs"]}
    assert shown == pytest.approx(expected)
