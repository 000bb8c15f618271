"""Each plot command writes a non-empty PNG whose metadata carries the expected title and axes,
from real result files / experts of the mini suite (small settings)."""

import dataclasses
import json

import numpy as np
import pytest
from _settings import SMALL
import torch
from PIL import Image

from cl_merge import plots
from cl_merge.cli import main
from cl_merge.config import resolve
from cl_merge.learner import GradientLearner
from cl_merge.registry import LEARNERS
from cl_merge.runner import execute




@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("runs")
    common = SMALL + [f"run.cache_dir={shared_cache}"]
    made = {}
    for name, order, extra in (("c-ta", 1, ["run.sar_store=true"]), ("c-ta", 2, ["run.sar_store=true"]),
                               ("swa", 1, ["run.sar_store=true"])):
        result, path = execute(resolve("mini", strategy=name, order=order, overrides=common + extra),
                               out_dir=out / "sar", progress=False)
        made[(name, order)] = (result, path)
    return out, made


def png_info(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 200
        return dict(im.info)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_matrix_heatmap(runs, tmp_path, capsys):
    _, made = runs
    result, path = made[("c-ta", 1)]
    png = tmp_path / "m.png"
    code, _ = cli(capsys, "plot", "matrix", path, "--out", png)
    assert code == 0
    info = png_info(png)
    assert info["Title"].startswith("Accuracy matrix (%) — c-ta (independent), mini order 1")
    assert "x: evaluated task; y: after learning task" in info["Description"]
    fig = plots.matrix_figure(result)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "θ0" and len(labels) == len(result["tasks"]) + 2  # + the experts' row
    assert labels[-1] == "expert (own task)"


def test_curves_of_acc_and_sar(runs, tmp_path, capsys):
    out, made = runs
    png = tmp_path / "c.png"
    code, _ = cli(capsys, "plot", "curves", out / "sar", "--out", png)
    assert code == 0
    info = png_info(png)
    assert info["Title"].startswith("ACC and SAR vs number of tasks — mini")
    assert "x: number of tasks learned; y: ACC over seen tasks (%)" in info["Description"]
    assert "y: SAR (mean over seen tasks)" in info["Description"]
    result = made[("c-ta", 1)][0]
    m = result["acc_matrix"]
    assert plots.seen_acc_curve(result) == pytest.approx([m[1][0], (m[2][0] + m[2][1]) / 2, sum(m[3]) / 3])
    fig = plots.curves_figure([made[k][0] for k in made])
    names = {line.get_label() for line in fig.axes[0].get_lines()}
    assert names == {"c-ta", "swa"}
    ta_line = next(line for line in fig.axes[1].get_lines() if line.get_label() == "c-ta")
    want = np.mean([made[("c-ta", o)][0]["sar"] for o in (1, 2)], axis=0)
    assert ta_line.get_ydata() == pytest.approx(want)


@dataclasses.dataclass
class PlainSGD(GradientLearner):
    name = "test_sgd"
    description = "SGD (test only)"

    def make_optimizer(self, params):
        return torch.optim.SGD(params, lr=self.lr)


@pytest.fixture
def sgd_learner():
    LEARNERS.register(PlainSGD)
    yield "test_sgd"
    LEARNERS.unregister("test_sgd")


def test_delta_histograms_of_two_learners(tmp_path, capsys, shared_cache, sgd_learner):
    png, data = tmp_path / "h.png", tmp_path / "h.json"
    code, _ = cli(capsys, "plot", "delta-hist", "--learners", "adam", sgd_learner, "--tasks", "1", "2",
                  "--out", png, "--data", data, "--quiet", *SMALL, f"run.cache_dir={shared_cache}")
    assert code == 0
    info = png_info(png)
    assert info["Title"].startswith("Parameter changes after fine-tuning from θ0 — mini")
    assert "[(a) adam] x: log10 |Δθ|; y: share of parameters (%)" in info["Description"]
    assert "[(b) test_sgd]" in info["Description"]
    numbers = json.loads(data.read_text())
    for per_task in numbers["learners"].values():
        assert len(per_task) == 2
        for d in per_task.values():  # every parameter is either binned or counted as unchanged
            assert sum(d["counts"]) + round(d["unchanged"] * d["count"]) == d["count"]
    adam_median = np.mean([d["median"] for d in numbers["learners"]["adam"].values()])
    sgd_median = np.mean([d["median"] for d in numbers["learners"]["test_sgd"].values()])
    assert adam_median != sgd_median


def test_disentanglement_error_grid(tmp_path, capsys, shared_cache):
    png, data = tmp_path / "d.png", tmp_path / "d.json"
    common = ["--learners", "adam", "--grid", "5", "--eval-n", "32", "--quiet", *SMALL, f"run.cache_dir={shared_cache}"]
    code, _ = cli(capsys, "plot", "disentanglement", "--others", "absent", "--out", png, "--data", data, *common)
    assert code == 0
    info = png_info(png)
    assert "Weight disentanglement error ξ(α1, α2)" in info["Title"] and "other tasks absent (Eq. 13)" in info["Title"]
    panel = json.loads(data.read_text())["panels"][0]
    alphas, xi = panel["alphas"], np.array(panel["xi"])
    assert alphas == pytest.approx([-0.5, 0.0, 0.5, 1.0, 1.5]) and xi.shape == (5, 5)
    assert np.all((xi >= 0) & (xi <= 2))
    assert xi[1, 1] == 0.0  # α = (0, 0): merged model = both references = θ0
    assert f"x: α1 ({panel['tasks'][0]}); y: α2 ({panel['tasks'][1]})" in info["Description"]

    # one grid point recomputed by hand: θ0 + 1.0 τ1 + 0.5 τ2 against θ0 + 1.0 τ1 and θ0 + 0.5 τ2
    source = plots.ExpertSource("mini", ["adam"], overrides=SMALL + [f"run.cache_dir={shared_cache}"], progress=False)
    experts = source.experts("adam", [0, 1])
    th = source.theta0
    tau = [{k: experts[i][k] - th[k] for k in th} for i in (0, 1)]
    tasks = source.stream.tasks

    def predict(coefs, t):
        state = {k: th[k] + sum(c * tau[i][k] for i, c in enumerate(coefs)) for k in th}
        source.adapter.set_state(state)
        return source.adapter.predict(torch.utils.data.Subset(tasks[t].test, range(32)), tasks[t])

    merged = [predict((1.0, 0.5), t) for t in (0, 1)]
    want = float((merged[0] != predict((1.0, 0.0), 0)).float().mean() + (merged[1] != predict((0.0, 0.5), 1)).float().mean())
    assert xi[3, 2] == pytest.approx(want)

    code, _ = cli(capsys, "plot", "disentanglement", "--others", "fixed", "--others-alpha", "auto",
                  "--out", png, "--data", data, *common)
    assert code == 0
    panel = json.loads(data.read_text())["panels"][0]
    assert panel["others"] == "fixed" and panel["other_tasks"] == [tasks[2].name]
    assert panel["others_alpha"] in plots.AUTO_ALPHAS and np.array(panel["xi"])[1, 1] == 0.0
    assert "fixed at α=" in png_info(png)["Title"]


@pytest.mark.parametrize("argv, needle", [
    (["disentanglement", "--learners", "adam", "--pair", "1", "1"], "two different tasks"),
    (["disentanglement", "--learners", "adam", "--pair", "1", "nope"], "task 'nope' is not in this stream"),
    (["disentanglement", "--learners", "adam", "--others-alpha", "x"], "--others-alpha must be 'auto'"),
    (["delta-hist", "--learners", "nope"], "unknown learner 'nope'"),
    (["delta-hist", "--learners", "adam", "ewc"], "learner 'ewc' keeps state across tasks"),
])
def test_bad_plot_input_is_one_line(tmp_path, capsys, argv, needle, shared_cache):
    png = tmp_path / "x.png"
    code, captured = cli(capsys, "plot", *argv, "--out", png, "--quiet", *SMALL, f"run.cache_dir={shared_cache}")
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0]
    assert not png.exists()


def test_plot_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    code, captured = cli(capsys, "plot", "matrix", bad, "--out", tmp_path / "m.png")
    assert code == 2 and str(bad) in captured.err
    code, captured = cli(capsys, "plot", "matrix", bad, "--out", tmp_path / "m.jpg")
    assert code == 2 and "must end in .png, .pdf or .svg" in captured.err
    assert not (tmp_path / "m.png").exists()
