"""The trust contract: no silent wrong result. Divergence, damaged tensor files, bad values, unwritable
targets, temp files and processes sharing a cache, each case as a new user would meet it (tiny runs)."""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _settings import TINY

from cl_merge import divergence
from cl_merge.checkpoint import Checkpointer
from cl_merge.cli import main
from cl_merge.config import resolve
from cl_merge.errors import UserError
from cl_merge.expert_cache import ExpertCache
from cl_merge.io import (DamagedFile, TEMP_SUFFIX, atomic_write, load_tensors, save_tensors_atomic, sweep_temps,
                         write_json_atomic)
from cl_merge.registry import MERGERS
from cl_merge.runner import execute, result_path

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv):
    """(exit code, stderr lines) of one ``cl-merge`` call."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def run_args(out, *overrides, strategy="c-ta"):
    return ["run", "--benchmark", "mini", "--strategy", strategy, "--quiet", "--out", out, *TINY, *overrides]


def flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Flip the last ``n`` bytes of a safetensors file: its tensor data, not its header."""
    data = bytearray(path.read_bytes())
    data[-n:] = bytes(b ^ 0xFF for b in data[-n:])
    path.write_bytes(bytes(data))


def nan_merge_at(monkeypatch, step: int, merger: str = "task_arithmetic"):
    """The merger's per-tensor rule yields a non-finite weight at ``step`` (first tensor it merges)."""
    cls, at = MERGERS.get(merger), step
    original = cls.merge_tensor
    poisoned = []

    def merge_tensor(self, x):
        merged = original(self, x)
        if x.step == at and not poisoned:
            poisoned.append(x.name)
            merged = merged.clone()
            merged.view(-1)[0] = float("nan")
        return merged

    monkeypatch.setattr(cls, "merge_tensor", merge_tensor)


# ---- divergence -----------------------------------------------------------------------------------------
def test_divergence_checks_name_the_quantity():
    class Ctx:
        step, iteration, params = 2, 4, {}
        task = type("T", (), {"name": "shape"})()

    with pytest.raises(divergence.Diverged, match=r"step 2 \(task shape, training iteration 5\): training loss is nan"):
        divergence.check_iteration(Ctx, torch.tensor(float("nan")))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    Ctx.params = {"w": p}
    with pytest.raises(divergence.Diverged, match="gradient norm is inf"):
        divergence.check_iteration(Ctx, torch.tensor(0.5))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    divergence.check_iteration(Ctx, torch.tensor(0.5))  # finite: no error
    assert divergence.grad_norm([p]) == pytest.approx(5.0)
    good, bad = {"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.tensor([0.0, float("-inf")])}
    divergence.check_step(1, "shape", good, good)
    with pytest.raises(divergence.Diverged, match="merged weight is -inf in b"):
        divergence.check_step(1, "shape", good, bad)


def test_a_huge_learning_rate_stops_the_run_with_exit_3_and_writes_no_results(tmp_path, capsys):
    rc, err = cli(capsys, *run_args(tmp_path / "out", "learner.lr=1e6"))
    assert rc == divergence.EXIT_CODE == 3
    assert len(err) == 1 and "diverged at step 1" in err[0] and "training loss" in err[0], err
    assert not list((tmp_path / "out").glob("*.json"))


def test_a_non_finite_merge_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    nan_merge_at(monkeypatch, step=2)
    rc, err = cli(capsys, *run_args(tmp_path / "out"))
    assert rc == 3 and len(err) == 1 and "diverged at step 2" in err[0] and "merged weight" in err[0], err
    out = tmp_path / "out"
    assert not list(out.glob("*.json"))
    (ckpt,) = out.glob("*.ckpt")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 1


def test_on_divergence_record_writes_a_diverged_run_shown_as_diverged(tmp_path, capsys, monkeypatch):
    from cl_merge import leaderboard as lb
    from cl_merge import report

    clean, _ = execute(resolve("mini", strategy="c-ta", overrides=TINY), out_dir=tmp_path / "out", progress=False)
    nan_merge_at(monkeypatch, step=2, merger=resolve("mini", strategy="c-ties").merger)
    rc, err = cli(capsys, *run_args(tmp_path / "out", "run.on_divergence=record", strategy="c-ties"))
    assert rc == 0 and not err
    (path,) = [p for p in (tmp_path / "out").glob("*.json") if "c-ties" in p.name]
    result = json.loads(path.read_text())
    assert result["diverged"] is True and clean["diverged"] is False
    assert result["divergence"]["step"] == 2 and result["divergence"]["quantity"] == "merged weight"
    assert result["divergence"]["task"] == result["tasks"][1]
    assert result["acc"] is None and result["bwt"] is None and result["normalized_acc"] is None
    assert len(result["acc_matrix"]) == 2  # θ0 and the finished step 1
    assert not list((tmp_path / "out").glob("*.ckpt"))
    # the report and the leaderboard show it as diverged, never as a number
    rows = report.rows([clean, result])
    md = report.markdown(rows)
    diverged_line = next(line for line in md.splitlines() if "c-ties" in line)
    assert diverged_line.count("diverged") == 5  # ACC, BWT, FWT, norm. ACC, SAR
    assert "diverged" in report.csv_text(rows)
    board = lb.markdown(lb.aggregate([clean, result]))
    line = next(line for line in board.splitlines() if line.startswith("| c-ties"))
    assert "diverged (1/1)" in line and "%" not in line
    assert not any(ch.isdigit() for cell in line.split("|")[5:9] for ch in cell if cell.strip() != "diverged (1/1)")
    # a diverged result still reads as a result file (report command); it has no matrix to plot
    rc, err = cli(capsys, "report", tmp_path / "out")
    assert rc == 0
    rc, err = cli(capsys, "plot", "matrix", path, "--out", tmp_path / "m.png")
    assert rc == 2 and len(err) == 1 and "diverged at step 2" in err[0] and not (tmp_path / "m.png").exists()


def test_on_divergence_does_not_change_the_run_id():
    a = resolve("mini", strategy="c-ta", overrides=TINY)
    b = resolve("mini", strategy="c-ta", overrides=TINY + ["run.on_divergence=record"])
    assert a.run_id() == b.run_id()
    # the id this config has without the setting (run.on_divergence is left out of the fingerprint);
    # it last changed when the SAR defaults did (sar_store on, sar_qkv)
    assert a.run_id().endswith("12d46716")


# ---- damaged tensor files ---------------------------------------------------------------------------------
def test_every_tensor_file_carries_a_content_hash_checked_on_read(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors_atomic(path, {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)})
    assert torch.equal(load_tensors(path)["a"], torch.arange(6.0).view(2, 3))
    flip_tensor_bytes(path, 4)
    with pytest.raises(DamagedFile, match="content hash mismatch"):
        load_tensors(path)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(path))  # written by another tool: no hash
    with pytest.raises(DamagedFile, match="no content hash"):
        load_tensors(path)


def test_a_flipped_cached_expert_is_retrained_with_one_warning(tmp_path, capsys):
    cache = ExpertCache(tmp_path)
    state = {"w": torch.randn(3, 4)}
    assert cache.get("k") is None
    cache.put("k", state)
    assert torch.equal(cache.get("k")["w"], state["w"])
    flip_tensor_bytes(tmp_path / "k.safetensors", 8)
    capsys.readouterr()
    assert cache.get("k") is None  # retrain
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "content hash mismatch" in err[0] and "training it again" in err[0]
    cache.put("k", state)
    assert torch.equal(cache.get("k")["w"], state["w"])
    # readable but of another shape than the model's: retrained too
    shaped = ExpertCache(tmp_path, expected={"w": ((4, 3), torch.float32)})
    assert shaped.get("k") is None
    shaped.release()


def test_runs_on_a_damaged_expert_cache_give_the_clean_result(tmp_path, capsys):
    cfg = resolve("mini", strategy="c-ta", overrides=TINY + [f"run.cache_dir={tmp_path / 'cache'}"])
    clean, _ = execute(cfg, out_dir=tmp_path / "a", progress=False)
    for f in (tmp_path / "cache" / "experts").glob("*.safetensors"):
        flip_tensor_bytes(f)
    capsys.readouterr()
    again, _ = execute(cfg, out_dir=tmp_path / "b", progress=False)
    assert again["acc_matrix"] == clean["acc_matrix"] and again["expert_source"] == ["trained", "trained"]
    assert sum("cached expert" in line for line in capsys.readouterr().err.splitlines()) == 2


@pytest.mark.parametrize("damage", ["flip", "wrong_shape"])
def test_a_damaged_or_misshapen_cached_head_is_rebuilt(tmp_path, capsys, damage):
    from safetensors.torch import save_file

    cfg = resolve("mini", strategy="c-ta", overrides=TINY + [f"run.cache_dir={tmp_path / 'cache'}"])
    clean, _ = execute(cfg, out_dir=tmp_path / "a", progress=False)
    heads = sorted((tmp_path / "cache" / "heads").glob("*.safetensors"))
    assert len(heads) == 2
    for f in heads:
        if damage == "flip":
            flip_tensor_bytes(f)
        else:  # readable, with a valid hash, but not the model's shape
            save_tensors_atomic(f, {"head": torch.randn(3, 7)})
    capsys.readouterr()
    again, _ = execute(cfg, out_dir=tmp_path / "b", progress=False)
    assert again["acc_matrix"] == clean["acc_matrix"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cached head" in line]
    assert len(warnings) == 2 and all("rebuilding it" in w for w in warnings)
    save_file({"head": torch.zeros(1)}, str(heads[0]))  # a foreign file: no hash, rebuilt as well


def test_a_flipped_checkpoint_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    nan_merge_at(monkeypatch, step=2)  # leaves the step-1 checkpoint
    assert cli(capsys, *run_args(tmp_path / "out"))[0] == 3
    monkeypatch.undo()
    (tensors,) = (tmp_path / "out").glob("*.ckpt/step-1.safetensors")
    flip_tensor_bytes(tensors)
    rc, err = cli(capsys, *run_args(tmp_path / "out"), "--resume")
    assert rc == 2 and len(err) == 1 and "refused" in err[0] and "content hash mismatch" in err[0], err
    assert not list((tmp_path / "out").glob("*.json"))


def test_checkpoint_and_merger_state_round_trip_with_hash(tmp_path):
    ck = Checkpointer(tmp_path / "c", "fp")
    ck.save(1, {"x": 1}, {"deployed": {"w": torch.ones(2)}, "merger": {"sum.w": torch.full((2,), 3.0)}})
    step, record, groups = ck.load()
    assert step == 1 and torch.equal(groups["merger"]["sum.w"], torch.full((2,), 3.0))
    flip_tensor_bytes(tmp_path / "c" / "step-1.safetensors", 4)
    with pytest.raises(UserError, match="refused"):
        ck.load()


# ---- bad values: exit 2, one line, nothing created ----------------------------------------------------
BAD = ["learner.steps=-1", "learner.steps=0", "benchmark.n_test=0", "benchmark.n_train=0", "learner.lr=-1",
       "learner.lr=0", "learner.lr=nan", "learner.lr=inf", "learner.batch_size=0", "learner.weight_decay=-0.1",
       "learner.warmup_steps=-1", "run.threads=-3", "run.eval_batch_size=0", "run.sar_energy=0",
       "run.on_divergence=ignore", "merger.alpha=nan", "benchmark.num_tasks=0", "benchmark.num_tasks=999"]


@pytest.mark.parametrize("override", BAD)
def test_each_bad_value_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, override):
    rc, err = cli(capsys, *run_args(tmp_path / "out", override))
    assert rc == 2 and len(err) == 1 and err[0].startswith("cl-merge: error:"), err
    assert override.split("=")[0].split(".")[-1] in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_creates_nothing(tmp_path, capsys):
    rc, err = cli(capsys, *run_args(tmp_path / "out", "run.device=cuda"))
    assert rc == 2 and len(err) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--seed", "abc"], ["--protocol", "sideways"]])
def test_argparse_errors_are_one_line(tmp_path, capsys, argv):
    rc, err = cli(capsys, "run", "--benchmark", "mini", "--strategy", "c-ta", "--out", tmp_path / "o", *argv)
    assert rc == 2 and len(err) == 1 and argv[0] in err[0], err
    assert not (tmp_path / "o").exists()


# ---- unwritable targets: exit 2, one line naming the path and the reason ------------------------------
def _one_line(err, *words):
    return len(err) == 1 and all(w in err[0] for w in words) and "internal error" not in err[0]


def test_out_under_proc_or_a_regular_file_is_one_line(tmp_path, capsys):
    rc, err = cli(capsys, *run_args("/proc/cl_merge_out"))
    assert rc == 2 and _one_line(err, "/proc/cl_merge_out"), err
    (tmp_path / "afile").write_text("x")
    rc, err = cli(capsys, *run_args(tmp_path / "afile" / "sub"))
    assert rc == 2 and _one_line(err, "afile", "not a directory"), err
    rc, err = cli(capsys, *run_args(tmp_path / "o", f"run.cache_dir={tmp_path / 'afile'}"))
    assert rc == 2 and _one_line(err, "run.cache_dir", "afile"), err
    assert not (tmp_path / "o").exists()


def test_a_read_only_out_dir_is_one_line(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: the file system says read-only instead
        real = os.mkdir

        def read_only(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", read_only)
    else:
        ro.chmod(0o555)
    rc, err = cli(capsys, *run_args(ro / "sub"))
    assert rc == 2 and _one_line(err, str(ro / "sub")), err
    assert "read-only" in err[0] or "permission denied" in err[0]


def test_a_full_disk_while_writing_results_is_one_line_and_leaves_no_temp(tmp_path, capsys, monkeypatch):
    import cl_merge.io as io

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)  # the results JSON is fsynced before its rename
    rc, err = cli(capsys, *run_args(tmp_path / "out"))
    assert rc == 2 and _one_line(err, "no space left", ".json"), err
    assert not list((tmp_path / "out").rglob(f"*{TEMP_SUFFIX}"))


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: No space left on device (os error 28)",
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'])
def test_safetensors_io_errors_become_os_errors_naming_the_target(tmp_path, monkeypatch, message):
    import safetensors.torch

    def fail(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(message)

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError) as info:
        save_tensors_atomic(tmp_path / "x.safetensors", {"a": torch.zeros(1)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_report_into_proc_or_onto_a_directory_is_one_line(tmp_path, capsys):
    execute(resolve("mini", strategy="c-ta", overrides=TINY), out_dir=tmp_path / "out", progress=False)
    rc, err = cli(capsys, "report", tmp_path / "out", "--markdown", "/proc/cl_merge.md")
    assert rc == 2 and _one_line(err, "/proc/cl_merge.md"), err
    (tmp_path / "adir").mkdir()
    rc, err = cli(capsys, "report", tmp_path / "out", "--csv", tmp_path / "adir")
    assert rc == 2 and _one_line(err, "adir", "is a directory"), err


# ---- temp files ---------------------------------------------------------------------------------------------
def test_temp_files_are_ours_and_swept_only_when_their_process_is_gone(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.json", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_text("{}")))
    host = socket.gethostname()
    assert seen[0].startswith(f".x.json.{host}-{os.getpid()}-") and seen[0].endswith(TEMP_SUFFIX)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f".e.safetensors.{host}-{dead}-abcd1234{TEMP_SUFFIX}"
    live = tmp_path / f".e.safetensors.{host}-{os.getpid()}-abcd1234{TEMP_SUFFIX}"
    other_host = tmp_path / f".e.safetensors.elsewhere-{dead}-abcd1234{TEMP_SUFFIX}"
    legacy_old, legacy_new = tmp_path / ".e.safetensors.x1y2z3w4.tmp", tmp_path / ".f.safetensors.a1b2c3d4.tmp"
    for p in (stale, live, other_host, legacy_old, legacy_new):
        p.write_bytes(b"0" * 16)
    os.utime(legacy_old, (time.time() - 3 * 86400,) * 2)
    assert sweep_temps(tmp_path) == 2
    assert not stale.exists() and not legacy_old.exists()
    assert live.exists() and other_host.exists() and legacy_new.exists() and (tmp_path / "x.json").exists()


def test_a_run_sweeps_dead_temps_from_its_cache_and_out_dir(tmp_path):
    out = tmp_path / "out"
    (out / ".cache" / "experts").mkdir(parents=True)
    (out / ".cl_merge").write_text("")
    stale = out / ".cache" / "experts" / f".k.safetensors.{socket.gethostname()}-999999999-abcd1234{TEMP_SUFFIX}"
    stale.write_bytes(b"0")
    execute(resolve("mini", strategy="c-ta", overrides=TINY), out_dir=out, progress=False)
    assert not stale.exists()


# ---- processes sharing a cache and a results directory -----------------------------------------------------
_TRAINER = r"""
import sys, time, torch
from cl_merge.expert_cache import ExpertCache
cache = ExpertCache(sys.argv[1])
state = cache.get("k")
if state is None:
    with open(sys.argv[2], "a") as f:
        f.write("trained\n")
    time.sleep(1.0)  # training: the other process arrives meanwhile
    cache.put("k", {"w": torch.full((2,), 7.0)})
else:
    assert float(state["w"][0]) == 7.0
print("ok")
"""


def test_two_processes_wanting_one_expert_train_it_once(tmp_path):
    log = tmp_path / "trained.log"
    procs = [subprocess.Popen([sys.executable, "-c", _TRAINER, str(tmp_path / "experts"), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert log.read_text().count("trained") == 1


def test_two_concurrent_runs_sharing_a_cache_train_each_expert_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["-m", "cl_merge", "run", "--benchmark", "mini", "--strategy", "c-ta", "--quiet",
            *TINY[:-1], "learner.steps=8", f"run.cache_dir={tmp_path / 'cache'}"]
    procs = [subprocess.Popen([sys.executable, *args, "--out", str(tmp_path / f"o{i}")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    sources = [s for i in range(2) for f in (tmp_path / f"o{i}").glob("*.json")
               for s in json.loads(f.read_text())["expert_source"]]
    assert len(sources) == 4 and sources.count("trained") == 2  # 2 distinct experts, each trained once


def test_a_run_id_held_by_another_process_is_waited_for_not_run_twice(tmp_path):
    from filelock import FileLock

    out = tmp_path / "out"
    cfg = resolve("mini", strategy="c-ta", overrides=TINY)
    out.mkdir()
    (out / ".cl_merge").write_text("")
    lock = FileLock(str(out / f".{cfg.run_id()}.lock"))
    lock.acquire()  # "another process" is running this run id
    got = {}
    worker = threading.Thread(target=lambda: got.update(r=execute(cfg, out_dir=out, progress=False)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive()  # waiting, not running it
    write_json_atomic(result_path(cfg, out), json.loads(json.dumps(_fake_result(cfg))))
    lock.release()
    worker.join(timeout=60)
    assert got["r"][0]["strategy"] == "from the other process"


def _fake_result(cfg):
    from cl_merge.results import STABLE_KEYS, SCHEMA_VERSION

    r = {k: None for k in STABLE_KEYS}
    r.update(schema_version=SCHEMA_VERSION, strategy="from the other process")
    return r


# ---- leftovers and provenance ------------------------------------------------------------------------------
def test_a_leftover_checkpoint_beside_a_finished_result_is_cleaned(tmp_path):
    cfg = resolve("mini", strategy="c-ta", overrides=TINY)
    _, path = execute(cfg, out_dir=tmp_path, progress=False)
    leftover = tmp_path / f"{cfg.run_id()}.ckpt"
    leftover.mkdir()
    (leftover / "state.json").write_text("{}")
    execute(cfg, out_dir=tmp_path, resume=True, progress=False)
    assert path.exists() and not leftover.exists()


def test_cache_dir_does_not_change_the_results_file(tmp_path):
    from cl_merge.results import strip_volatile

    a, _ = execute(resolve("mini", strategy="c-ta", overrides=TINY), out_dir=tmp_path / "a", progress=False)
    cfg = resolve("mini", strategy="c-ta", overrides=TINY + [f"run.cache_dir={tmp_path / 'elsewhere'}"])
    b, _ = execute(cfg, out_dir=tmp_path / "b", progress=False)
    assert strip_volatile(a) == strip_volatile(b)
    assert "cache_dir" not in b["run_settings"] and "cache_dir" not in b["config"]["run_params"]


def test_sigterm_during_a_ray_grid_becomes_an_interrupt():
    import signal

    from cl_merge.ray_engine import _TermAsInterrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _TermAsInterrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_files_written_tensor_by_tensor_carry_per_tensor_hashes_checked_on_read(tmp_path):
    """The streaming writer (disk parameter store, SAR store) records a content hash per tensor; a
    flipped byte in the data is refused on read, with or without a layout written up front."""
    import torch

    from cl_merge.io import DamagedFile
    from cl_merge.streaming import TensorSource, TensorWriter

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    for layout in (None, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}):
        path = tmp_path / f"f{layout is None}.safetensors"
        with TensorWriter(path, layout=layout) as w:
            for n, t in tensors.items():
                w.add(n, t)
        src = TensorSource(path, verify=True)
        assert all(torch.equal(src[n], t) for n, t in tensors.items())
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x10  # inside the last tensor's data
        path.write_bytes(bytes(raw))
        damaged = TensorSource(path)  # files that carry hashes are checked by default
        with pytest.raises(DamagedFile, match="content hash mismatch"):
            [damaged[n] for n in tensors]
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(foreign))
    assert torch.equal(TensorSource(foreign)["a"], torch.zeros(2))  # someone else's file: nothing to check
    with pytest.raises(DamagedFile, match="no content hash"):
        TensorSource(foreign, verify=True)["a"]
