"""End-to-end vision20 runs on 2 tasks with a tiny model, through the real loaders, caches and runner."""

import pytest

from cl_merge.benchmarks.vision20 import fixtures
from cl_merge.benchmarks.vision20.benchmark import Vision20Benchmark
from cl_merge.benchmarks.vision20.specs import seeded_order, task_specs
from cl_merge.config import resolve
from cl_merge.runner import execute

NAMES = {s.id: s.name for s in task_specs()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("v20e2e")
    names = {"gtsrb", "svhn"} | {NAMES[i] for i in seeded_order(5)[:2]}
    return fixtures.write_all(root, names=names, sizes={"train": 8, "test": 6})


def overrides(data_root, tmp_path):
    return ["benchmark.num_tasks=2", "benchmark.model=cl-merge-mini-vit", "benchmark.pretrained=none",
            f"benchmark.data_root={data_root}", f"benchmark.hf_cache_dir={tmp_path / 'hf'}",
            "benchmark.num_workers=0", "learner.steps=2", "learner.batch_size=4",
            f"run.cache_dir={tmp_path / 'cache'}", "run.sar=false"]


def test_two_task_run_then_a_second_strategy_reuses_experts_and_eval_caches(data_root, tmp_path):
    cfg = resolve("vision20", strategy="c-ta", order=1, overrides=overrides(data_root, tmp_path))
    result, path = execute(cfg, out_dir=tmp_path / "runs", progress=False)
    assert path.exists()
    assert result["benchmark"] == "vision20" and result["order"] == 1
    assert result["tasks"] == ["gtsrb", "svhn"]  # Table 6 order 1 starts 6 (GTSRB), 5 (SVHN)
    assert result["model"] == "open_clip:cl-merge-mini-vit/random-init"
    assert len(result["acc_matrix"]) == 3 and all(len(r) == 2 for r in result["acc_matrix"])
    assert all(0.0 <= v <= 1.0 for row in result["acc_matrix"] for v in row)
    assert result["expert_source"] == ["trained", "trained"]
    assert result["hyperparameters"]["learner.lr"] == 1e-5  # the benchmark's paper default

    caches = sorted((tmp_path / "cache" / "vision20-eval").glob("*.npy"))
    # one file per evaluated split: the test sets, and the validation sets of the final val_acc row
    assert [c.name.split("-")[0] for c in caches] == ["gtsrb", "gtsrb", "svhn", "svhn"]
    assert len(result["val_acc"]) == 2 and all(0.0 <= v <= 1.0 for v in result["val_acc"])
    stamps = {c: c.stat().st_mtime_ns for c in caches}

    cfg2 = resolve("vision20", strategy="swa", order=1, overrides=overrides(data_root, tmp_path))
    result2, _ = execute(cfg2, out_dir=tmp_path / "runs", progress=False)
    assert result2["expert_source"] == ["cache", "cache"]  # independent experts shared across strategies
    assert result2["acc_matrix"][0] == result["acc_matrix"][0]  # same θ0 and test data
    assert result2["expert_acc"] == result["expert_acc"]
    assert {c: c.stat().st_mtime_ns for c in caches} == stamps  # decoded once, reused


def test_seeded_order_stream_records_its_permutation(data_root, tmp_path):
    bench = Vision20Benchmark(num_tasks=2, model="cl-merge-mini-vit", pretrained="none", data_root=str(data_root),
                              hf_cache_dir=str(tmp_path / "hf"), num_workers=0)
    stream = bench.build_stream("seed:5", seed=0)
    assert stream.order == "seed:5" and stream.permutation == seeded_order(5)
    assert stream.names == [NAMES[i] for i in seeded_order(5)[:2]]
    assert stream.order_record()["task_ids"] == seeded_order(5)[:2]
