"""The multitask protocol end to end on the mini suite (tiny settings): every expert trained from θ0
(the independent protocol's expert cache), Fishers where the merger needs them, one merge, the
results keys of every other run. All runs share one expert cache, so each expert is trained once."""

import json

import pytest
import torch
from _settings import TINY

from cl_merge.cli import main
from cl_merge.config import resolve
from cl_merge.errors import UserError
from cl_merge.multitask_merge import kind_blocks, kind_matrix, merge_at_once
from cl_merge.registry import MERGERS, STRATEGIES
from cl_merge.results import STABLE_KEYS
from cl_merge.runner import execute
from cl_merge.strategies.tsv_merge import TSVMerger, tsv_matrix
from cl_merge.tensor_kinds import join_qkv, split_qkv

T = 2
NEW_STRATEGIES = ["ta", "ties-m", "iso-c", "iso-cts", "tsv-m", "fisher", "dare-ta", "epimer"]
# keys present only in some runs (a merger that chose α on validation data; generated orders; benchmarks)
CONDITIONAL_KEYS = {"chosen_alpha", "order_detail", "benchmark_detail"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("multitask")


def run(out, name="runs", overrides=(), **kw):
    cfg = resolve("mini", overrides=list(TINY) + list(overrides) + [f"run.cache_dir={out / 'cache'}"], **kw)
    return execute(cfg, out_dir=out / name, progress=False)


@pytest.fixture(scope="module")
def independent(out):
    """c-ta under the independent protocol: trains the experts every multitask run reuses."""
    return run(out, strategy="c-ta")[0]


@pytest.mark.parametrize("strategy", NEW_STRATEGIES)
def test_each_multitask_strategy_runs_with_the_keys_of_every_other_run(out, independent, strategy):
    result, path = run(out, strategy=strategy)
    assert json.loads(path.read_text())["acc"] == result["acc"]
    assert result["protocol"] == "multitask"
    assert set(result) - CONDITIONAL_KEYS == set(independent) - CONDITIONAL_KEYS
    assert set(STABLE_KEYS) <= set(result)
    m = result["acc_matrix"]
    assert len(m) == 2 and m[0] == independent["acc_matrix"][0]  # row 0: θ0, the same for every run
    assert all(len(row) == T and all(0.0 <= v <= 1.0 for v in row) for row in m)
    assert result["acc"] == pytest.approx(sum(m[1]) / T)
    assert result["bwt"] is None and result["fwt"] is None and result["bwt_denominator"] is None
    assert result["conventions"]["bwt"].startswith("null")
    # the experts are the independent protocol's: same cache entries, same accuracies
    assert result["expert_source"] == ["cache"] * T
    assert result["expert_acc"] == independent["expert_acc"]
    assert result["normalized_acc"] == pytest.approx(sum(a / e for a, e in zip(m[1], result["expert_acc"])) / T)
    # SAR of the merged model, one entry: the mean over every task's own update
    assert len(result["sar"]) == 1 and len(result["sar_per_task"][0]) == T
    assert result["sar"][0] == pytest.approx(sum(result["sar_per_task"][0]) / T)
    assert result["sar_scope"] == "all_tasks"
    assert len(result["timings"]["per_step"]) == 1
    assert not list(path.parent.glob("*.ckpt"))


def test_task_arithmetic_at_once_equals_the_independent_protocols_last_step(out, independent):
    """θ0 + α Σ τ_t either way: the generic all-at-once path of a continual rule."""
    result, _ = run(out, strategy="ta")
    assert result["acc_matrix"][1] == independent["acc_matrix"][-1]
    assert result["sar"][0] == pytest.approx(independent["sar"][-1], abs=2e-3)  # same model (past updates: bf16)


def test_fishers_are_cached_beside_the_expert_and_shared_between_mergers(out, independent):
    run(out, strategy="fisher")
    epimer, _ = run(out, name="again", strategy="epimer")
    record = epimer["merge_record"][0]
    assert record["fisher_source"] == ["cache"] * T
    assert record["fisher_samples"] == [64] * T  # n_train = 64 < the 256-sample floor: the whole split
    assert isinstance(record["epimer_eta_mean"], float)
    other, _ = run(out, name="fraction", strategy="fisher", overrides=["merger.fisher_min_samples=16"])
    assert other["merge_record"][0]["fisher_source"] == ["computed"] * T  # other settings, other file
    assert other["merge_record"][0]["fisher_samples"] == [16] * T


def test_an_unsupported_merger_protocol_pair_is_one_line_before_anything_is_created(tmp_path, capsys):
    with pytest.raises(UserError, match="merger epimer does not support the independent protocol"):
        resolve("mini", strategy="epimer", protocol="independent")
    with pytest.raises(UserError, match="merger isotropic does not support the multitask protocol"):
        resolve("mini", learner="adam", merger="isotropic", protocol="multitask")
    out_dir = tmp_path / "runs"
    code = main(["run", "--benchmark", "mini", "--learner", "adam", "--merger", "tsv_m", "--protocol", "sequential",
                 "--out", str(out_dir), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "does not support the sequential protocol" in err[0]
    assert not out_dir.exists()


def test_protocol_defaults_and_declarations():
    assert resolve("mini", learner="adam", merger="epimer").protocol == "multitask"
    assert resolve("mini", learner="adam", merger="task_arithmetic").protocol == "independent"
    for name in STRATEGIES.names():  # every catalog strategy runs under its default protocol
        s = STRATEGIES.get(name)
        assert s.protocol in MERGERS.get(s.merger).protocols, name
    for merger in ("iso_c", "iso_cts", "tsv_m", "fisher", "dare", "epimer"):
        assert MERGERS.get(merger).protocols == ("multitask",)
    assert "multitask" in MERGERS.get("task_arithmetic").protocols
    assert "multitask" not in MERGERS.get("ties").protocols  # its continual rules are not TIES-merging


def test_the_protocol_cuts_a_stacked_qkv_projection_into_q_k_v():
    """merge_at_once passes the tensor-kind rule: in_proj_weight (3d × d) is merged as three d × d
    matrices, conv/bias tensors take the non-matrix rule (oracle: tsv_matrix per block, mean)."""
    g = torch.Generator().manual_seed(0)
    d = 8
    base = {"blocks.0.attn.in_proj_weight": torch.randn(3 * d, d, generator=g),
            "blocks.0.attn.in_proj_bias": torch.randn(3 * d, generator=g),
            "conv1.weight": torch.randn(4, 3, 2, 2, generator=g)}
    experts = [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(2)]
    merged = merge_at_once(TSVMerger(), base, experts)
    name = "blocks.0.attn.in_proj_weight"
    assert kind_blocks(name, base[name]) and kind_matrix(name, base[name])
    assert not kind_matrix("conv1.weight", base["conv1.weight"])
    deltas = [split_qkv(e[name] - base[name]) for e in experts]
    oracle = join_qkv(*(tsv_matrix([dl[i] for dl in deltas], k=d // 2) for i in range(3)))
    torch.testing.assert_close(merged[name], base[name] + oracle, rtol=1e-5, atol=1e-5)
    for other in ("blocks.0.attn.in_proj_bias", "conv1.weight"):
        mean = sum(e[other] - base[other] for e in experts) / 2
        torch.testing.assert_close(merged[other], base[other] + mean, rtol=1e-6, atol=1e-6)


def test_a_fisher_merger_is_refused_before_training_on_an_adapter_without_a_per_sample_loss(tmp_path, monkeypatch):
    from cl_merge.models.base import ModelAdapter
    from cl_merge.models.clip import ClipClassifier

    monkeypatch.setattr(ClipClassifier, "per_sample_loss", ModelAdapter.per_sample_loss)
    cfg = resolve("mini", strategy="epimer", overrides=list(TINY) + [f"run.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(UserError, match="needs Fisher diagonals"):
        execute(cfg, out_dir=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "cache").glob("experts/*.safetensors"))


CONTINUAL_VARIANTS = [("c-iso-c", "iso-c"), ("c-iso-cts", "iso-cts"), ("c-tsv-m", "tsv-m"), ("c-epimer", "epimer")]


@pytest.mark.parametrize("strategy,at_once", CONTINUAL_VARIANTS, ids=[c for c, _ in CONTINUAL_VARIANTS])
def test_each_continual_variant_runs_from_the_cli_and_its_last_step_is_the_multitask_merge(
        out, independent, strategy, at_once):
    """Under the independent protocol the continual variant's step T is the all-at-once merge of the same
    (cached) experts; its state size is recorded per step (and grows with t for all but c-iso-c)."""
    runs = out / f"cli-{strategy}"
    code = main(["run", "--benchmark", "mini", "--strategy", strategy, "--out", str(runs), "--quiet",
                 *TINY, f"run.cache_dir={out / 'cache'}"])
    assert code == 0
    (path,) = runs.rglob("*.json")
    result = json.loads(path.read_text())
    assert result["protocol"] == "independent" and len(result["acc_matrix"]) == T + 1
    assert result["expert_source"] == ["cache"] * T
    assert set(result) - CONDITIONAL_KEYS == set(independent) - CONDITIONAL_KEYS
    sizes = result["merger_state_bytes"]
    assert len(sizes) == T and all(isinstance(s, int) and s > 0 for s in sizes)
    assert (sizes[1] > sizes[0]) == (strategy != "c-iso-c")
    reference, _ = run(out, strategy=at_once)
    final, merged = result["acc_matrix"][-1], reference["acc_matrix"][1]
    assert final == pytest.approx(merged, abs=1.5 / 48)  # same model up to float32 summation order
    if strategy == "c-epimer":  # the Fisher diagonals are the multitask epimer's cache entries: found there
        assert result["merge_record"][-1]["fisher_source"] in ("cache", "computed")
        assert reference["merge_record"][0]["fisher_source"] == ["cache"] * T
        assert isinstance(result["merge_record"][-1]["epimer_eta_mean"], float)
