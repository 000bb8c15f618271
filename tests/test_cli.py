"""The CLI contract: exit 0 on success, 2 with one clear stderr line on bad input, nothing half-written."""

import json
import os

import pytest

from cl_merge.cli import main
from cl_merge.config import resolve


def cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("cl-merge: error: ")
    return lines[0]


def test_run_list_and_report(tmp_path, capsys, fast_overrides):
    out_dir = tmp_path / "runs"
    code, out, _ = cli(capsys, "run", "--benchmark", "mini", "--strategy", "c-ta", "--out", str(out_dir),
                       "--quiet", *fast_overrides)
    assert code == 0 and "ACC" in out
    files = [p for p in out_dir.glob("*.json")]
    assert len(files) == 1
    code, out, _ = cli(capsys, "list")
    assert code == 0 and "c-ta" in out and "task_arithmetic" in out and "mini" in out
    md, csv = tmp_path / "t.md", tmp_path / "t.csv"
    code, out, _ = cli(capsys, "report", str(out_dir), "--markdown", str(md), "--csv", str(csv))
    assert code == 0 and "c-ta" in out
    assert md.read_text().startswith("| strategy") and "c-ta" in csv.read_text().splitlines()[1]


@pytest.mark.parametrize("argv, needle", [
    (["--benchmark", "nope", "--strategy", "c-ta"], "unknown benchmark 'nope'"),
    (["--benchmark", "mini", "--strategy", "nope"], "unknown strategy 'nope'"),
    (["--benchmark", "mini", "--learner", "nope", "--merger", "swa"], "unknown learner 'nope'"),
    (["--benchmark", "mini", "--learner", "adam", "--merger", "nope"], "unknown merger 'nope'"),
    (["--benchmark", "mini", "--strategy", "c-ta", "merger.nope=1"], "unknown key 'merger.nope'"),
    (["--benchmark", "mini", "--strategy", "c-ta", "merger.alpha=abc"], "merger.alpha must be a number"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, needle):
    out_dir = tmp_path / "runs"
    code, _, err = cli(capsys, "run", *argv, "--out", str(out_dir), "--quiet")
    assert code == 2
    assert needle in error_line(err)
    assert not out_dir.exists()


def test_foreign_results_directory_is_refused(tmp_path, capsys, fast_overrides):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "run", "--benchmark", "mini", "--strategy", "c-ta", "--out", str(foreign),
                       "--quiet", *fast_overrides)
    assert code == 2 and "not a cl_merge results directory" in error_line(err)
    assert os.listdir(foreign) == ["notes.txt"]


def _checkpoint_dir(out_dir, overrides):
    cfg = resolve("mini", strategy="c-ft", overrides=overrides)
    return out_dir / f"{cfg.run_id()}.ckpt"


@pytest.mark.parametrize("content, needle", [
    ("{truncated", "is corrupt"),
    (json.dumps({"format": 1, "fingerprint": "0" * 64, "step": 1, "tensor_file": "step-1.safetensors",
                 "record": {}}), "belongs to a different configuration"),
    (json.dumps({"format": 1, "fingerprint": None, "step": 1, "tensor_file": "missing.safetensors",
                 "record": {}}), "is corrupt"),
])
def test_corrupt_or_mismatched_checkpoint_is_refused_on_resume(tmp_path, capsys, fast_overrides, content, needle):
    out_dir = tmp_path / "runs"
    ckpt = _checkpoint_dir(out_dir, fast_overrides)
    ckpt.mkdir(parents=True)
    (out_dir / ".cl_merge").write_text("")
    if '"fingerprint": null' in content:  # right config, missing tensors
        cfg = resolve("mini", strategy="c-ft", overrides=fast_overrides)
        content = content.replace('"fingerprint": null', json.dumps({"fingerprint": cfg.fingerprint()})[1:-1])
    (ckpt / "state.json").write_text(content)
    code, _, err = cli(capsys, "run", "--benchmark", "mini", "--strategy", "c-ft", "--out", str(out_dir),
                       "--resume", "--quiet", *fast_overrides)
    line = error_line(err)
    assert code == 2 and needle in line and ckpt.name in line
    assert not list(out_dir.glob("*.json"))


def test_report_names_a_corrupt_result_file(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("[1, 2")
    code, _, err = cli(capsys, "report", str(bad))
    assert code == 2 and "broken.json" in error_line(err)
