"""Experts loaded from files drive the same protocol loop (pure continual merging)."""

import pytest
import torch
from safetensors.torch import save_file

from cl_merge.config import resolve
from cl_merge.errors import UserError
from cl_merge.runner import execute

DATA = ["benchmark.num_tasks=3", "benchmark.n_train=32", "benchmark.n_val=16", "benchmark.n_test=96"]


def write_experts(tmp_path):
    from cl_merge.benchmarks.mini.benchmark import MiniBenchmark

    bench = MiniBenchmark(num_tasks=3)
    adapter = bench.build_model(tmp_path / "cache", "cpu", 256)
    theta0 = adapter.get_state()
    directory = tmp_path / "experts"
    directory.mkdir()
    g = torch.Generator().manual_seed(0)
    experts = {}
    for name in bench.build_stream(1, 0).names:
        experts[name] = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
        save_file(experts[name], str(directory / f"{name}.safetensors"))
    return directory, theta0, experts


def test_checkpoint_experts_are_merged_by_any_merger(tmp_path):
    directory, theta0, experts = write_experts(tmp_path)
    cfg = resolve("mini", learner="checkpoint", merger="task_arithmetic", protocol="independent",
                  overrides=DATA + [f"learner.path={directory}", "merger.alpha=1.0"])
    result, _ = execute(cfg, out_dir=tmp_path / "out", progress=False)
    assert result["expert_source"] == ["checkpoint"] * 3
    # α = 1 after one task deploys the first file exactly
    assert result["acc_matrix"][1][0] == pytest.approx(result["expert_acc"][0])
    assert not (tmp_path / "out" / ".cache" / "experts").exists()  # files are not copied into the cache


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = resolve("mini", learner="checkpoint", merger="swa", protocol="independent",
                  overrides=DATA + [f"learner.path={tmp_path / 'nowhere'}"])
    with pytest.raises(UserError, match="does not exist"):
        execute(cfg, out_dir=tmp_path / "out", progress=False)
