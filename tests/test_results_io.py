import json
import os

import pytest

from cl_merge.errors import UserError
from cl_merge.io import write_json_atomic
from cl_merge.results import STABLE_KEYS, ensure_results_dir, find_results, load_result


def test_atomic_write_leaves_no_temp_file_and_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_results_dir_must_be_ours_or_empty(tmp_path):
    ensure_results_dir(tmp_path / "new")
    assert (tmp_path / "new" / ".cl_merge").exists()
    ensure_results_dir(tmp_path / "new")  # ours: accepted again
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not a cl_merge results directory"):
        ensure_results_dir(foreign)
    assert sorted(os.listdir(foreign)) == ["thesis.tex"]  # nothing written into it


def test_load_result_names_the_corrupt_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        load_result(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(UserError, match="partial.json is not a cl_merge result"):
        load_result(partial)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({k: None for k in STABLE_KEYS} | {"schema_version": 1}))
    assert load_result(good)["schema_version"] == 1
    assert set(find_results([tmp_path])) == {bad, partial, good}


def test_atomic_writes_get_the_permissions_of_a_plainly_created_file(tmp_path):
    from cl_merge.io import _UMASK, write_json_atomic

    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    write_json_atomic(tmp_path / "atomic.json", {"a": 1})
    mode = (tmp_path / "atomic.json").stat().st_mode & 0o777
    assert mode == plain.stat().st_mode & 0o777 == 0o666 & ~_UMASK
