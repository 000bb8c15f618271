"""Leaderboard grids: parsing/expansion, aggregation from hand-made result files, resume, errors."""

import csv
import io
import statistics

import pytest
from _settings import SMALL

from cl_merge import leaderboard as lb
from cl_merge.cli import main
from cl_merge.io import write_json_atomic
from cl_merge.results import STABLE_KEYS, ensure_results_dir
from cl_merge.runner import result_path




def fake_result(strategy="c-ta", order=1, seed=0, acc_last=(0.8, 0.6, 0.7), diag=(0.9, 0.8, 0.7),
                sar=(1.0, 0.9, 0.8), protocol="independent", benchmark="mini", model="open_clip:mini/x",
                hyper=None, scope="seen_tasks"):
    T = len(acc_last)
    matrix = [[0.3] * T]
    for t in range(1, T):
        matrix.append([diag[i] if i == t - 1 else 0.5 for i in range(T)])
    matrix.append(list(acc_last))
    matrix[T][T - 1] = diag[T - 1] if acc_last[T - 1] is None else acc_last[T - 1]
    expert = [0.95] * T
    r = {k: None for k in STABLE_KEYS}
    r.update({
        "schema_version": 1, "benchmark": benchmark, "tasks": [f"t{i}" for i in range(T)], "order": order,
        "seed": seed, "strategy": strategy, "learner": "adam", "merger": "m", "protocol": protocol,
        "hyperparameters": hyper or {"merger.alpha": 0.3, "benchmark.num_tasks": T},
        "acc_matrix": matrix, "expert_acc": expert, "acc": sum(matrix[T]) / T,
        "bwt": sum(matrix[T][i] - matrix[i + 1][i] for i in range(T - 1)) / (T - 1), "bwt_denominator": T - 1,
        "normalized_acc": sum(matrix[T][i] / expert[i] for i in range(T)) / T, "sar": list(sar),
        "timings": {"wall_s": 1.0}, "model": model, "registered_strategy": True, "sar_scope": scope,
        "sar_energy": 0.95,
    })
    return r


# ---- aggregation ----------------------------------------------------------------------------------
def test_mean_sample_std_and_worst_order_over_orders():
    accs = {1: (0.8, 0.6, 0.7), 2: (0.5, 0.6, 0.4), 3: (0.9, 0.9, 0.8)}
    sars = {1: (1, 0.9, 0.8), 2: (1, 0.9, 0.6), 3: (1, 0.9, None)}
    results = [fake_result(order=o, acc_last=accs[o], sar=sars[o]) for o in accs]
    results.append(fake_result(strategy="c-ft", protocol="sequential", order=1, acc_last=(0.2, 0.3, 0.9)))
    rows = lb.aggregate(results)
    assert [r.strategy for r in rows] == ["c-ta", "c-ft"]  # sorted by mean ACC
    ta = rows[0]
    want_acc = [sum(a) / 3 for a in accs.values()]
    mean, std, n = ta.stats["acc"]
    assert n == 3 and mean == pytest.approx(statistics.fmean(want_acc))
    assert std == pytest.approx(statistics.stdev(want_acc))  # sample std (n − 1)
    bwts = [r["bwt"] for r in results[:3]]
    assert ta.stats["bwt"][0] == pytest.approx(statistics.fmean(bwts))
    assert ta.stats["bwt"][1] == pytest.approx(statistics.stdev(bwts))
    # SAR after the final step; a null value is left out of the mean, not counted as zero
    assert ta.stats["sar"][:2] == (pytest.approx(0.7), pytest.approx(statistics.stdev([0.8, 0.6])))
    assert ta.stats["sar"][2] == 2
    assert ta.worst_order == 2 and ta.per_order[2]["acc"] == pytest.approx(0.5)
    assert ta.stats["normalized_acc"][0] == pytest.approx(statistics.fmean(r["normalized_acc"] for r in results[:3]))
    ft = rows[1]
    assert ft.n == 1 and ft.stats["acc"][1] is None  # one run: no std

    md = lb.markdown(rows)
    assert "| c-ta | independent | 3 | 3 |" in md
    assert f"{100 * statistics.fmean(want_acc):.1f} ± {100 * statistics.stdev(want_acc):.1f}" in md
    assert "2 (50.0)" in md  # worst order and its ACC
    assert "## Per-order values" in md and "sample standard deviation" in md
    table = list(csv.DictReader(io.StringIO(lb.csv_text(rows))))
    assert table[0]["strategy"] == "c-ta" and float(table[0]["acc_std"]) == pytest.approx(statistics.stdev(want_acc), abs=1e-6)
    assert table[0]["worst_order"] == "2" and float(table[0]["acc_order_3"]) == pytest.approx(sum(accs[3]) / 3)
    assert table[1]["acc_std"] == ""


def test_seeds_average_within_an_order_and_variants_get_their_own_rows():
    results = [fake_result(order=1, seed=0, acc_last=(0.6, 0.6, 0.6)), fake_result(order=1, seed=1, acc_last=(0.8, 0.8, 0.8)),
               fake_result(order=1, hyper={"merger.alpha": 0.5}, acc_last=(0.1, 0.1, 0.1))]
    rows = lb.aggregate(results)
    assert sorted(r.name for r in rows) == ["c-ta [merger.alpha=0.3]", "c-ta [merger.alpha=0.5]"]
    main_row = next(r for r in rows if r.variant == "merger.alpha=0.3")
    assert main_row.n == 2 and main_row.per_order[1]["acc"] == pytest.approx(0.7)


def test_order_invariant_rows_have_no_worst_order():
    rows = lb.aggregate([fake_result(order=o, acc_last=(0.6, 0.6, 0.6)) for o in (1, 2, 3)])
    assert rows[0].worst_order is None and rows[0].stats["acc"][1] == 0.0
    assert "| all equal |" in lb.markdown(rows)


def test_vision20_rows_show_the_papers_table_1():
    reference = lb.load_reference()
    model = "open_clip:ViT-B-32/openai"
    results = [fake_result(benchmark="vision20", model=model, order=o, acc_last=(0.7,) * 8, diag=(0.9,) * 8,
                           sar=(1.0,) * 8) for o in (1, 2)]
    rows = lb.aggregate(results, reference)
    assert lb.backbone_of(model) == "ViT-B/32" and lb.backbone_of("openai/clip-vit-large-patch14") == "ViT-L/14"
    assert rows[0].reference["acc_mean"] == 67.5 and rows[0].reference["bwt_mean"] == -9.6
    md = lb.markdown(rows, reference=reference)
    assert "paper ACC" in md and "67.5 ± 0.0" in md and "-9.6 ± 1.5" in md
    assert "paper pre-trained 48.1 / fine-tuned 90.4" in md
    assert "paper ACC" not in lb.markdown(lb.aggregate([fake_result()]))  # only for vision20


# ---- grids ------------------------------------------------------------------------------------------
GRID = """
benchmark = "mini"
strategies = ["c-ta", "swa"]
orders = [1, 2]
seeds = [0]
num_tasks = [2, 3]
overrides = ["learner.steps=5"]
out = "runs"
markdown = "board/leaderboard.md"
csv = "board/leaderboard.csv"

[[runs]]
learner = "adam"
merger = "swa"
protocol = "sequential"
overrides = ["learner.lr=3e-4"]
"""


def write_grid(tmp_path, text=GRID):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_grid_expands_to_resolved_configs(tmp_path):
    grid = lb.load_grid(write_grid(tmp_path))
    assert grid.out == tmp_path / "runs" and grid.markdown == tmp_path / "board" / "leaderboard.md"
    configs = lb.expand(grid)
    assert len(configs) == 2 * 3 * 2  # T x entries x orders
    assert {c.benchmark_params["num_tasks"] for c in configs} == {2, 3}
    assert all(c.learner_params["steps"] == 5 for c in configs)
    custom = [c for c in configs if c.strategy is None]
    assert len(custom) == 4 and all(c.protocol == "sequential" and c.learner_params["lr"] == 3e-4 for c in custom)
    assert len({c.run_id() for c in configs}) == len(configs)


@pytest.mark.parametrize("text, needle", [
    ("benchmark = 'mini'\nstrategies = ['nope']", "unknown strategy 'nope'"),
    ("benchmark = 'mini'\nstrategies = ['c-ta']\nordres = [1]", "unknown key 'ordres'"),
    ("benchmark = 'mini'\nstrategies = ['c-ta']\norders = [99]", "unknown order '99'"),
    ("benchmark = 'mini'\nstrategies = ['c-ta']\nseeds = ['a']", "'seeds' must be a non-empty list of integers"),
    ("benchmark = 'mini'\nstrategies = ['c-ta']\noverrides = ['merger.nope=1']", "unknown key 'merger.nope'"),
    ("benchmark = 'mini'\n[[runs]]\nlearner = 'adam'", "needs strategy"),
    ("benchmark = 'mini'", "no runs"),
    ("benchmark = 'mini\nstrategies", "is not valid TOML"),
])
def test_bad_grids_are_one_line_user_errors_naming_the_file(tmp_path, capsys, text, needle):
    path = write_grid(tmp_path, text)
    assert main(["leaderboard", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(path) in err[0]
    assert not (tmp_path / "runs").exists()


def _fill(configs, out, acc=0.5):
    ensure_results_dir(out)
    for c in configs:
        T = c.benchmark_params["num_tasks"]
        r = fake_result(strategy=c.label, order=c.order, protocol=c.protocol, acc_last=(acc,) * T,
                        diag=(0.9,) * T, sar=(0.9,) * T, hyper=c.hyperparameters())
        write_json_atomic(result_path(c, out), r)


def test_finished_runs_are_skipped_and_reports_come_from_the_files(tmp_path, capsys, monkeypatch):
    path = write_grid(tmp_path)
    grid = lb.load_grid(path)
    configs = lb.expand(grid)
    _fill(configs, grid.out)

    def must_not_run(*a, **k):
        raise AssertionError("a finished run was executed again")

    monkeypatch.setattr("cl_merge.runner.instantiate", must_not_run)
    assert main(["leaderboard", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "0 ran now, 12 had finished earlier" in out
    md = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "| c-ta | independent | 2 | 2 | 50.0 ± 0.0 |" in md
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert len(rows) == 6 and {r["T"] for r in rows} == {"2", "3"}

    # --report-only with a missing run: aggregates what exists and says what is missing
    result_path(configs[0], grid.out).unlink()
    md_only = tmp_path / "only.md"
    assert main(["leaderboard", str(path), "--report-only", "--markdown", str(md_only)]) == 0
    assert "1 of 12 runs have no results yet" in capsys.readouterr().out
    assert "| c-ta | independent | 2 | 1 |" in md_only.read_text()


def test_a_corrupt_result_file_is_named(tmp_path, capsys):
    path = write_grid(tmp_path)
    grid = lb.load_grid(path)
    configs = lb.expand(grid)
    _fill(configs, grid.out)
    bad = result_path(configs[3], grid.out)
    bad.write_text('{"schema_version": 1, "acc": ')
    for argv in (["leaderboard", str(path), "--report-only"], ["leaderboard", str(path), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0] and "corrupt" in err[0]


def test_report_only_without_any_results_is_a_user_error(tmp_path, capsys):
    path = write_grid(tmp_path)
    assert main(["leaderboard", str(path), "--report-only"]) == 2
    assert "run it without --report-only" in capsys.readouterr().err


def test_a_grid_runs_missing_runs_end_to_end(tmp_path, capsys, shared_cache):
    """The real loop: 2 orders of c-ta run, a rerun skips both."""
    text = (f"benchmark = 'mini'\nstrategies = ['c-ta']\norders = [1, 2]\nnum_tasks = [2]\n"
            f"overrides = {[o for o in SMALL if 'num_tasks' not in o] + [f'run.cache_dir={shared_cache}', 'run.sar_store=true']!r}\n"
            f"markdown = 'lb.md'\n").replace("'", '"')
    path = write_grid(tmp_path, text)
    assert main(["leaderboard", str(path), "--quiet"]) == 0
    assert "2 ran now, 0 had finished earlier" in capsys.readouterr().out
    md = (tmp_path / "lb.md").read_text()
    assert "| c-ta | independent | 2 | 2 |" in md and "seen_tasks: mean over all tasks seen so far" in md
    assert main(["leaderboard", str(path), "--quiet"]) == 0
    assert "0 ran now, 2 had finished earlier" in capsys.readouterr().out


# ---- sweeps and selection on validation data ------------------------------------------------------------
def test_sweep_axis_expands_per_entry_relative_to_each_default(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('benchmark = "mini"\nstrategies = ["c-ta", "saim", "c-ft"]\nselect = "val_acc"\n'
                    '[sweep]\n"merger.alpha" = {times_default = [0.5, 1.0, 2.0]}\n'
                    '[[runs]]\nstrategy = "c-ties"\nsweep = {"merger.alpha" = [0.1, 0.2]}\n')
    g = lb.load_grid(grid)
    configs = lb.expand(g)
    alphas = {}
    for c in configs:
        alphas.setdefault(c.label, set()).add(c.merger_params.get("alpha"))
    assert alphas["c-ta"] == {0.15, 0.3, 0.6}  # TA's default 0.3 × factors
    assert alphas["saim"] == {0.5, 1.0, 2.0}
    assert alphas["c-ties"] == {0.1, 0.2, 0.3}  # its own axis, plus its default run (strategy α 0.3)
    assert len([c for c in configs if c.label == "c-ft"]) == 1  # identity merger: no α, run once
    defaults = {c.label: c for c in configs if c.run_id() in g.default_run_ids}
    assert set(defaults) == {"c-ta", "saim", "c-ft", "c-ties"} and defaults["c-ta"].merger_params["alpha"] == 0.3
    bad = tmp_path / "bad.toml"
    bad.write_text('benchmark = "mini"\nstrategies = ["c-ft"]\n[sweep]\n"merger.alpha" = [1.0]\n')
    with pytest.raises(lb.UserError, match="no entry declares sweep key 'merger.alpha'"):
        lb.expand(lb.load_grid(bad))


class SplitGuard(dict):
    """A result whose test-split figures raise when read: selection must not touch them."""

    TEST_KEYS = {"acc", "bwt", "acc_matrix", "normalized_acc", "normalized_acc_per_task", "fwt", "expert_acc", "sar"}

    def __getitem__(self, key):
        if key in self.TEST_KEYS:
            raise AssertionError(f"selection read the test figure {key!r}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self.TEST_KEYS:
            raise AssertionError(f"selection read the test figure {key!r}")
        return super().get(key, default)


def test_selection_uses_validation_only_and_reports_the_chosen_settings_test_figures():
    # α = 0.3 is best on test, α = 0.6 on validation: the choice must follow validation
    runs = []
    for order in (1, 2):
        for alpha, test, val in ((0.3, (0.9, 0.9, 0.9), [0.5, 0.5, 0.5]), (0.6, (0.6, 0.6, 0.6), [0.7, 0.8, 0.7])):
            r = fake_result(order=order, acc_last=test, hyper={"merger.alpha": alpha, "benchmark.num_tasks": 3})
            r["val_acc"] = val
            runs.append(r)
    chosen, choices = lb.select_by_validation([SplitGuard(r) for r in runs])
    assert [c["selected"] for c in choices] == [{"merger.alpha": 0.6}]
    assert choices[0]["val_acc"] == pytest.approx(statistics.fmean([0.7, 0.8, 0.7]))
    rows = lb.aggregate([dict(r) for r in chosen])
    lb.mark_tuned(rows, choices)
    assert len(rows) == 1 and rows[0].n == 2 and rows[0].stats["acc"][0] == pytest.approx(0.6)
    assert rows[0].name == "c-ta [tuned on val: merger.alpha=0.6]"
    runs[0]["val_acc"] = None
    with pytest.raises(lb.UserError, match="no val_acc"):
        lb.select_by_validation(runs)


def _multitask_result(strategy, merged, zero_shot=(0.3, 0.5), experts=(0.9, 0.7)):
    r = fake_result(strategy=strategy, protocol="multitask", acc_last=tuple(merged), scope="all_tasks")
    r.update(acc_matrix=[list(zero_shot), list(merged)], expert_acc=list(experts), bwt=None, bwt_denominator=None,
             acc=sum(merged) / len(merged), sar=[0.8],
             normalized_acc=sum(a / e for a, e in zip(merged, experts)) / len(merged))
    return r


def test_a_multitask_table_shows_zero_shot_and_expert_rows_and_its_own_footnote():
    from cl_merge.grid.formatting import markdown

    text = markdown(lb.aggregate([_multitask_result("tsv-m", (0.8, 0.6)), _multitask_result("ta", (0.7, 0.5))]))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    zero = next(line for line in table if line.startswith("| zero-shot"))
    expert = next(line for line in table if line.startswith("| experts"))
    assert zero.split(" | ")[4] == "40.0" and expert.split(" | ")[4] == "80.0"  # means of row 0 / expert_acc
    assert expert.split(" | ")[7] == "100.0"
    assert "BWT is null under the multitask protocol" in text and "denominator T−1" not in text
    assert "all_tasks: mean over every task's own update against the one merged model" in text
    continual = markdown(lb.aggregate([fake_result()]))
    assert "zero-shot" not in continual and "BWT (denominator T−1)" in continual
