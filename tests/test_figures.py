"""Every figure kind renders to PNG, PDF and SVG (valid files, metadata, byte-identical when redrawn),
from the committed mini results (no training): colours and markers are fixed per strategy, and
multitask results (two matrix rows) are drawn as points in the curves."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from cl_merge import plots
from cl_merge.cli import main
from cl_merge.figure_style import STRATEGY_STYLES, style_of, styles_for
from cl_merge.results import load_result

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "results" / "mini"
MULTITASK = ROOT / "results" / "mini_multitask" / "runs"


def committed(strategy, orders=(1, 2), where=MINI / "runs", alpha=None):
    """The committed runs of one strategy; with ``alpha``, only those at that merger.alpha (the tuned
    sweep's other runs sit beside the defaults)."""
    found = []
    for path in sorted(where.glob(f"mini_{strategy}_*.json")):
        r = load_result(path)
        if r["order"] in orders and (alpha is None or r["hyperparameters"].get("merger.alpha") == alpha):
            found.append((r, path))
    assert found, f"no committed {strategy} runs"
    return found


def figures():
    saim = committed("saim", alpha=1.0)
    cft = committed("c-ft")
    ta = committed("ta", orders=(1,), where=MULTITASK)
    return {
        "matrix": plots.matrix_figure(saim[0][0]),
        "matrix_multitask": plots.matrix_figure(ta[0][0]),
        "curves": plots.curves_figure([r for r, _ in saim + cft + ta]),
        "delta_hist": plots.delta_hist_figure(json.loads((MINI / "plots" / "delta_hist.json").read_text())),
        "disentanglement": plots.disentanglement_figure(
            json.loads((MINI / "plots" / "disentanglement_all_tasks.json").read_text())["panels"]),
    }


@pytest.fixture(scope="module")
def drawn():
    return figures()


def check_file(path: Path, title: str):
    data = path.read_bytes()
    if path.suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            assert im.size[0] > 600 and im.size[1] > 400  # 200 dpi
            assert im.info["Title"] == title
    elif path.suffix == ".pdf":
        assert data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")
        assert b"/CreationDate" not in data and b"/Creator (cl_merge)" in data
    else:
        root = ET.fromstring(data)  # well-formed XML
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        titles = [e.text for e in root.iter("{http://purl.org/dc/elements/1.1/}title")]
        assert title in titles
        assert b"<dc:date>" not in data


def test_every_figure_kind_in_every_format(tmp_path):
    # two independent drawings of every figure, each saved as PNG, PDF and SVG in the same order:
    # valid files with their title in the metadata, and the same bytes (no dates, fixed SVG ids)
    first, second = figures(), figures()
    for name in first:
        for fmt in ("png", "pdf", "svg"):
            path = plots.save_figure(first[name], tmp_path / f"{name}.{fmt}")
            check_file(path, plots.title_of(first[name]))
            again = plots.save_figure(second[name], tmp_path / f"{name}_again.{fmt}")
            assert again.read_bytes() == path.read_bytes(), (name, fmt)


def test_matrix_marks_diagonal_expert_row_and_scores(drawn):
    fig = drawn["matrix"]
    ax = fig.axes[0]
    saim = committed("saim", alpha=1.0)[0][0]
    T = len(saim["tasks"])
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "θ0" and labels[-1] == "expert (own task)" and len(labels) == T + 2
    outlined = [(p.get_x(), p.get_y()) for p in ax.patches]
    assert outlined == [(t - 1.5, t - 0.5) for t in range(1, T + 1)]  # row t, column t-1
    assert f"ACC {100 * saim['acc']:.1f}, BWT {100 * saim['bwt']:.1f}" in plots.title_of(fig)
    multitask = drawn["matrix_multitask"].axes[0]
    assert [t.get_text() for t in multitask.get_yticklabels()] == ["θ0", "merged (all at once)", "expert (own task)"]
    assert not multitask.patches  # one merge: no "right after it was learned" cell


def test_curves_fixed_styles_outside_legend_and_multitask_points(drawn):
    fig = drawn["curves"]
    ax_acc = fig.axes[0]
    lines = {line.get_label(): line for line in ax_acc.get_lines() if not line.get_label().startswith("_")}
    for name in ("saim", "c-ft"):
        label = next(k for k in lines if k.split(" ")[0] == name)
        assert lines[label].get_color() == STRATEGY_STYLES[name].color
        assert lines[label].get_marker() == STRATEGY_STYLES[name].marker
    # the multitask run is one point at x = T with its ACC over all tasks
    ta = committed("ta", orders=(1,), where=MULTITASK)[0][0]
    point = next(c for c in ax_acc.containers if c.get_label() == "ta, all at once")
    x, y = point.lines[0].get_data()
    assert list(x) == [len(ta["tasks"])] and y[0] == pytest.approx(100 * sum(ta["acc_matrix"][1]) / len(ta["tasks"]))
    assert not ax_acc.get_legend() and fig.legends  # the legend is the figure's, outside the axes
    assert "mean ± std over 1/2 task orders" in plots.title_of(fig)


def test_style_table_is_fixed_and_never_repeats():
    names = [f"learner{i}+merger{i % 7}" for i in range(30)] + list(STRATEGY_STYLES)
    styles = styles_for(names)
    assert len(set(styles.values())) == len(names)  # no two series share colour and marker
    assert styles_for(reversed(names)) == styles  # depends on the set of names only
    assert style_of("saim") == STRATEGY_STYLES["saim"] == styles["saim"]
    assert style_of("adam+swa") == style_of("adam+swa")


def test_plot_curves_cli_on_multitask_results_and_pdf(tmp_path, capsys):
    out = tmp_path / "c.pdf"
    code = main(["plot", "curves", str(MULTITASK), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    check_file(out, "ACC and SAR vs number of tasks — mini (mean ± std over 1 task order)")


def test_plot_curves_of_a_grid_file_reads_only_its_runs(tmp_path, capsys):
    # results/mini/runs also holds the tuned sweep's runs; the grid file picks the defaults' 50
    out = tmp_path / "c.svg"
    code = main(["plot", "curves", str(ROOT / "results" / "leaderboard_mini.toml"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    root = ET.fromstring(out.read_bytes())
    assert "ACC and SAR vs number of tasks — mini (mean ± std over 5 task orders)" in [
        e.text for e in root.iter("{http://purl.org/dc/elements/1.1/}title")]
    assert "[merger.alpha=" not in out.read_text()


def test_unknown_extension_is_one_line(tmp_path, capsys):
    code = main(["plot", "curves", str(MULTITASK), "--out", str(tmp_path / "c.jpg")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "must end in .png, .pdf or .svg" in err[0]
    assert not (tmp_path / "c.jpg").exists()


def test_every_registered_strategy_has_its_own_fixed_style():
    import cl_merge.strategies  # noqa: F401  (registers the catalog)
    from cl_merge.registry import STRATEGIES

    missing = [n for n in STRATEGIES.names() if n not in STRATEGY_STYLES]
    assert not missing, missing
    fixed = list(STRATEGY_STYLES.values())
    assert len(set(fixed)) == len(fixed)  # no two registered strategies look alike
