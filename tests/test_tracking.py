"""run.log=tensorboard,wandb,mlflow, offline: one tiny mini run logs to all three, and each backend's
files are read back with its own reader (TensorBoard's EventAccumulator, wandb's offline run file,
MLflow's client on a local file store) and compared with the results file."""

import subprocess
import sys
from pathlib import Path

import pytest
from _settings import TINY

from cl_merge.cli import main
from cl_merge.config import resolve
from cl_merge.results import find_results, strip_volatile
from cl_merge.runner import execute

TRACKERS = "run.log=tensorboard,wandb,mlflow"


def seen_acc(matrix, t):
    return sum(matrix[t][:t]) / t


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, shared_cache):
    tmp = tmp_path_factory.mktemp("tracking")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DIR", str(tmp / "wandb-home"))
    mp.setenv("WANDB_CONFIG_DIR", str(tmp / "wandb-config"))
    mp.setenv("WANDB_CACHE_DIR", str(tmp / "wandb-cache"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = TINY + [f"run.cache_dir={shared_cache}"]
    config = resolve("mini", strategy="c-ta", overrides=common + [TRACKERS])
    result, path = execute(config, out_dir=tmp / "out", progress=False)
    yield {"tmp": tmp, "result": result, "path": path, "logs": tmp / "out" / ".tracking", "common": common}
    mp.undo()


def test_tracking_changes_neither_run_id_nor_results(tracked, tmp_path):
    common = tracked["common"]
    plain = resolve("mini", strategy="c-ta", overrides=common)
    assert plain.run_id() == tracked["result"]["run_id"]
    sys.modules.pop("cl_merge.tracking", None)
    result, _ = execute(plain, out_dir=tmp_path / "plain", progress=False)
    assert "cl_merge.tracking" not in sys.modules  # no tracker named: the tracking code is never imported
    assert strip_volatile(result) == strip_volatile(tracked["result"])
    assert "log" not in result["run_settings"] and "log" not in result["config"]["run_params"]
    # the copy of the results beside the TensorBoard events is not a second result of the directory
    assert find_results([tracked["path"].parent]) == [tracked["path"]]


def test_backends_are_imported_only_when_named():
    code = ("import sys, cl_merge.tracking, cl_merge.runner; "
            "print([m for m in ('wandb', 'mlflow', 'torch.utils.tensorboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_tensorboard_event_file_round_trip(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tracked["result"]
    run_dir = tracked["logs"] / "tensorboard" / result["run_id"]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    T, m = len(result["tasks"]), result["acc_matrix"]
    for t in range(1, T + 1):
        assert [e.value for e in events.Scalars("acc_seen") if e.step == t] == pytest.approx([seen_acc(m, t)])
    for i, name in enumerate(result["tasks"]):
        assert [e.value for e in events.Scalars(f"acc/{name}")] == pytest.approx([m[t][i] for t in range(1, T + 1)])
    assert [e.value for e in events.Scalars("bwt")] == pytest.approx([result["bwt"]])  # from step 2 (T = 2)
    assert [e.value for e in events.Scalars("sar")] == pytest.approx(result["sar"])
    assert {"time/fit_s", "time/merge_s", "time/eval_s", "expert_acc"} <= set(tags)
    assert events.Scalars("final/acc")[0].value == pytest.approx(result["acc"])
    assert {"config/text_summary", "results_json/text_summary"} <= set(events.Tags()["tensors"])
    assert (run_dir / tracked["path"].name).read_bytes() == tracked["path"].read_bytes()


def wandb_records(path: Path):
    """The records of a wandb offline run file (.wandb): a LevelDB-style log of protobuf Records in
    32 KiB blocks after a 7-byte header; chunk header = crc (4), length (2, little-endian), type (1)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_run_round_trip(tracked):
    import json

    result = tracked["result"]
    files = list((tracked["logs"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, config, artifacts, names = {}, {}, [], []
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items.get("_step", record.history.step.num), {}).update(items)
        elif kind == "artifact":
            artifacts.append((record.artifact.name, record.artifact.type))
        elif kind == "run":  # the run's name and its config
            names.append(record.run.display_name)
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    assert result["run_id"] in names
    assert config["learner.lr"] == result["hyperparameters"]["learner.lr"]
    assert config["strategy"] == "c-ta"
    m = result["acc_matrix"]
    for t in range(1, len(result["tasks"]) + 1):
        assert history[t]["acc_seen"] == pytest.approx(seen_acc(m, t))
    assert history[len(result["tasks"])]["final/acc"] == pytest.approx(result["acc"])
    assert (f"results-{result['run_id']}", "results") in artifacts


def mlflow_client(tracked):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(tracked["logs"] / "mlruns").resolve().as_uri())


def test_mlflow_file_store_round_trip(tracked):
    result = tracked["result"]
    client = mlflow_client(tracked)
    experiment = client.get_experiment_by_name("cl_merge")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == result["run_id"]]
    assert run.info.status == "FINISHED"
    assert run.data.params["learner.lr"] == str(result["hyperparameters"]["learner.lr"])
    assert run.data.params["protocol"] == "independent"
    history = client.get_metric_history(run.info.run_id, "acc_seen")
    m = result["acc_matrix"]
    history = sorted((h.step, h.value) for h in history)
    assert [h[0] for h in history] == list(range(1, len(result["tasks"]) + 1))
    assert [h[1] for h in history] == pytest.approx([seen_acc(m, t) for t in range(1, len(result["tasks"]) + 1)])
    assert run.data.metrics["final/acc"] == pytest.approx(result["acc"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [tracked["path"].name]


def test_multitask_merge_is_logged_once_at_T(tracked, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = resolve("mini", strategy="ta", overrides=tracked["common"] + ["run.log=mlflow",
                                                                          f"run.log_dir={tmp_path / 'logs'}"])
    result, _ = execute(config, out_dir=tmp_path / "out", progress=False)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "logs" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cl_merge").experiment_id])
    T = len(result["tasks"])
    (point,) = client.get_metric_history(run.info.run_id, "acc_all")
    assert point.step == T and point.value == pytest.approx(result["acc"])
    assert "acc_seen" not in run.data.metrics  # one merge: no t × t matrix


def test_unknown_tracker_is_one_line(tmp_path, capsys):
    code = main(["run", "--benchmark", "mini", "--strategy", "c-ta", "--out", str(tmp_path / "o"), "--quiet",
                 *TINY, "run.log=tensorboard,neptune"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown tracker 'neptune'" in err[0]
    assert not (tmp_path / "o").exists()


class Memory:
    """A backend that keeps what it is given (the Tracker interface, no files)."""

    name = "memory"

    def __init__(self, fail=False):
        self.logged, self.fail = [], fail

    def log(self, values, step):
        if self.fail:
            raise RuntimeError("tracker server went away")
        self.logged.append((step, values))


def test_running_metrics_resume_backfill_and_a_failing_backend(tmp_path, capsys):
    from types import SimpleNamespace

    from cl_merge.tracking import Trackers

    trackers = Trackers([], resolve("mini", strategy="c-ta"), tmp_path)
    kept, broken = Memory(), Memory(fail=True)
    trackers.backends, trackers.tasks = [broken, kept], ["a", "b", "c"]
    record = {"acc_matrix": [[0.1, 0.2, 0.3], [0.5, 0.2, 0.3], [0.4, 0.6, 0.3]], "expert_acc": [0.5, 0.7],
              "sar": [0.9, 0.8], "sar_current": [0.9, 0.7], "step_timings": [{"fit_s": 1.0}, {"fit_s": 2.0}]}
    # a run resumed after step 1: its first live step is 2, step 1 comes from the restored record
    trackers.after_step(SimpleNamespace(step=2, expert_acc=0.7), record)
    assert [step for step, _ in kept.logged] == [1, 2]
    first, second = kept.logged[0][1], kept.logged[1][1]
    assert first["acc_seen"] == pytest.approx(0.5) and "bwt" not in first and first["expert_acc"] == 0.5
    assert second["acc_seen"] == pytest.approx((0.4 + 0.6) / 2)
    assert second["bwt"] == pytest.approx(0.4 - 0.5)  # A[2][1] − A[1][1]
    assert second["acc/c"] == pytest.approx(0.3) and second["time/fit_s"] == 2.0 and second["sar"] == 0.8
    assert trackers.backends == [kept]  # the failing one is dropped after one warning line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.log=memory: log failed (RuntimeError: tracker server went away)" in err[0]
