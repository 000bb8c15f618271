"""The on-disk parameter store (MergeBench's): every merger, through the real checkpoint path, gives
bit-identical results to the in-memory store under the one merge executor and the one protocol loop,
and a step holds far less than base + previous + expert."""


import pytest
import torch
from safetensors.torch import load_file, save_file

from _mergebench import DOMAINS, write_tiny_mergebench
from cl_merge.errors import UserError
from cl_merge.registry import LEARNERS, MERGERS
from cl_merge.merge_engine import MergeContext, StepInputs, merge_step
from cl_merge.merger import Merger
from cl_merge.reductions import kth_smallest_abs
from cl_merge.store import DiskStorage
from cl_merge.streaming import LiveTensors, TensorSource, TensorWriter, checkpoint_files
from cl_merge.task import Task

MERGER_CASES = [
    ("task_arithmetic", {"alpha": 0.3}), ("swa", {}), ("identity", {}), ("magmax", {"alpha": 0.5}),
    ("isotropic", {"lam": 0.25, "alpha": 1.0}), ("ties", {"variant": "seed"}),
    ("ties", {"variant": "seed", "trim_scope": "tensor"}), ("ties", {"variant": "fusionbench"}),
    ("opcm", {"alpha": 0.5}),
    ("c_iso_c", {"alpha": 1.0}), ("c_iso_cts", {}), ("c_tsv_m", {}), ("c_tsv_m", {"k": 2}), ("c_epimer", {"k": 2}),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_mergebench(tmp_path_factory.mktemp("mergebench"))


def mergeable_names(root):
    return [n for n in checkpoint_files(root / "base") if "embed_tokens" not in n and "lm_head" not in n]


def domain_task(root, domain):
    return Task(name=domain, classnames=(), templates=(), train=[], val=[], test=[], fingerprint=domain,
                metadata={"expert_checkpoint": str(root / domain)})


def test_every_registered_merger_is_covered():
    covered = {name for name, _ in MERGER_CASES}
    # every merger of the continual protocols (the on-disk store runs the independent one; the
    # multi-task mergers merge every expert at once in memory: docs/protocol.md)
    assert covered == {n for n in MERGERS.names() if "independent" in MERGERS.get(n).protocols}


def step_context(merger, t, theta0, domain):
    """The run's task count (the continual multi-task mergers fix their ranks from it) and, for a merger
    that needs one, a Fisher diagonal (seeded per domain: both stores see the same one)."""
    fisher = None
    if getattr(merger, "needs_fisher", False):
        g = torch.Generator().manual_seed(sum(map(ord, domain)))
        fisher = {n: torch.rand(v.shape, generator=g) for n, v in theta0.items()}
    return MergeContext(step=t, tasks=len(DOMAINS), fisher=fisher)


def disk_storage(root, work, names, tracker=None):
    return DiskStorage(root / "base", work, names=names, model_names=names, tracker=tracker)


def disk_step(storage, merger, base, previous, expert, state, t, context=None):
    deployed, state_w, scratch, release = storage.writers(t)
    return merge_step(merger, StepInputs(base, previous, expert, base, t), state, deployed_writer=deployed,
                      state_writer=state_w, scratch_writer=scratch, release=release, context=context)


@pytest.mark.parametrize("name,params", MERGER_CASES, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p in MERGER_CASES])
def test_streamed_merge_equals_in_memory_merge(tiny, tmp_path, monkeypatch, name, params):
    if name == "ties":  # the tiny model is below the concatenation limit: take the two-pass histogram route
        from cl_merge import reductions

        monkeypatch.setattr(reductions, "CONCAT_LIMIT", 0)
    names = mergeable_names(tiny)
    learner = LEARNERS.get("checkpoint")()  # the real expert source: task metadata -> checkpoint folder
    tracker = LiveTensors()
    storage = disk_storage(tiny, tmp_path, names, tracker)
    base = storage.theta0(None)
    theta0 = {n: base[n].clone() for n in names}
    model_bytes = sum(v.numel() * v.element_size() for v in theta0.values())
    reference, streamed = MERGERS.get(name)(**params), MERGERS.get(name)(**params)
    reference.reset(theta0)
    streamed.reset()
    deployed = dict(theta0)
    previous, state = base, storage.empty_state()
    for t, domain in enumerate(DOMAINS, start=1):
        task = domain_task(tiny, domain)
        expert_mem = learner.fit(theta0, type("Ctx", (), {"task": task})())  # in-memory expert
        context = step_context(streamed, t, theta0, domain)
        deployed = reference.merge(base=theta0, previous=deployed, expert=expert_mem, start=theta0, step=t,
                                   context=step_context(reference, t, theta0, domain))
        del expert_mem
        expert, source = storage.open_expert(learner, task, names)
        assert source == f"checkpoint:{tiny / domain}"
        tracker.reset_peak()
        result = disk_step(storage, streamed, base, previous, expert, state, t, context)
        # memory: a step never holds more than base + previous + expert; in fact a few tensors of one layer
        assert tracker.peak <= 3 * model_bytes
        assert tracker.peak < model_bytes
        storage.discard(*(s for s in (previous, state) if s is not base))
        previous, state = result.deployed, result.state
        for n in names:  # the same executor over either store: bit-identical
            assert torch.equal(previous[n], deployed[n]), n
        memory_state = reference.state_dict()
        assert set(state) == set(memory_state)
        for k in state:
            assert torch.equal(state[k], memory_state[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed-5.safetensors", "merger-state-5.safetensors"]


@pytest.mark.parametrize("concat_limit", [0, 1 << 22], ids=["histogram", "concatenated"])
def test_streamed_kth_matches_kthvalue(monkeypatch, concat_limit):
    from cl_merge import reductions

    monkeypatch.setattr(reductions, "CONCAT_LIMIT", concat_limit)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(50, 7, generator=g), torch.zeros(30), torch.randn(13, generator=g).round(decimals=1)]
    flat = torch.cat([t.reshape(-1).abs() for t in tensors])
    for k in (1, 2, 30, 31, 100, 200, flat.numel()):
        assert float(kth_smallest_abs(tensors, k)) == float(flat.kthvalue(k).values)


@pytest.mark.parametrize("with_layout", [True, False])
def test_tensor_writer_roundtrip(tmp_path, with_layout):
    g = torch.Generator().manual_seed(1)
    tensors = {"a.weight": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0)}
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} if with_layout else None
    path = tmp_path / "x.safetensors"
    with TensorWriter(path, layout=layout, metadata={"step": "3"}) as w:
        for k in reversed(list(tensors)):
            w.add(k, tensors[k])
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(back[k], tensors[k])
    assert list(tmp_path.iterdir()) == [path]  # no spool or temp file left


def test_checkpoint_source_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .safetensors"):
        TensorSource(tmp_path / "empty")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="lacks 1 tensor"):
        TensorSource(tmp_path / "m.safetensors", names=["x", "y"])
    with pytest.raises(UserError, match="does not exist"):
        TensorSource(tmp_path / "nope")


class HalfwayMerger(Merger):
    """A third-party merger that only defines a per-tensor rule: deployed = previous + β·(expert − previous)."""

    name = "halfway"
    beta = 0.25

    def merge_tensor(self, x):
        return x.previous + self.beta * (x.expert - x.previous)


def test_a_per_tensor_rule_alone_runs_on_both_stores(tiny, tmp_path):
    names = mergeable_names(tiny)
    learner = LEARNERS.get("checkpoint")()
    storage = disk_storage(tiny, tmp_path, names)
    base = storage.theta0(None)
    theta0 = {n: base[n].clone() for n in names}
    memory, disk = HalfwayMerger(), HalfwayMerger()
    memory.reset()
    oracle, deployed, previous, state = dict(theta0), dict(theta0), base, storage.empty_state()
    for t, domain in enumerate(DOMAINS[:3], start=1):
        task = domain_task(tiny, domain)
        expert = learner.fit(theta0, type("Ctx", (), {"task": task})())
        oracle = {n: oracle[n] + 0.25 * (expert[n] - oracle[n]) for n in names}  # the rule, written out
        deployed = memory.merge(base=theta0, previous=deployed, expert=expert, start=theta0, step=t)
        result = disk_step(storage, disk, base, previous, storage.open_expert(learner, task, names)[0], state, t)
        previous, state = result.deployed, result.state
        for n in names:
            assert torch.equal(deployed[n], oracle[n]) and torch.equal(previous[n], oracle[n])
    assert memory.state_dict() == {} and list(state) == []


def test_core_has_no_per_merger_code():
    """The executor and the loop know no merger by name and import no plugin."""
    import inspect

    import cl_merge.merge_engine
    import cl_merge.protocol
    import cl_merge.store

    for module in (cl_merge.merge_engine, cl_merge.protocol, cl_merge.store):
        text = inspect.getsource(module)
        assert "cl_merge.strategies" not in text
        for merger in MERGERS.names():
            assert f'"{merger}"' not in text, (module.__name__, merger)


def _probe_evaluator(adapter, task, split):
    """A cheap deterministic score in [0, 1] that depends on every weight: the probability the model gives
    to the next byte of a fixed text, averaged."""
    tok = adapter.tokenizer
    ids = torch.tensor([tok(f"domain {task.name}: 12345")["input_ids"]])
    with torch.no_grad():
        logp = adapter.model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(logp.gather(1, ids[0, 1:, None]).exp().mean())


def _runs(tiny, tmp_path, merger_name, params, protocol="independent"):
    from cl_merge.checkpoint import Checkpointer
    from cl_merge.models.hf_causal_lm import CausalLMAdapter, load_causal_lm
    from cl_merge.progress import Reporter
    from cl_merge.protocol import run_protocol
    from cl_merge.sar import SARMeter
    from cl_merge.task import Stream

    def stream():
        tasks = [domain_task(tiny, d) for d in DOMAINS]
        for t in tasks:
            t.evaluator = _probe_evaluator
        return Stream("mergebench", tasks, order=1, seed=0)

    def adapter():
        model, tok = load_causal_lm(str(tiny / "base"))
        return CausalLMAdapter(model, tok, "tiny")

    def run(name, storage=None, adapter_=None):
        adapter_ = adapter_ or adapter()
        checkpointer = Checkpointer(tmp_path / name, "x")
        if storage is not None:
            names = list(adapter_.trainable_parameters())
            storage = DiskStorage(tiny / "base", checkpointer.directory / "stream", names=names,
                                  model_names=[n for n, _ in adapter_.model.named_parameters()],
                                  expert_eval_full=False)
        with Reporter(enabled=False) as rep:
            return run_protocol(stream=stream(), adapter=adapter_, learner=LEARNERS.get("checkpoint")(),
                                learner_name="checkpoint", merger=MERGERS.get(merger_name)(**params),
                                protocol=protocol, seed=0, eval_unseen=True, checkpointer=checkpointer,
                                resume=False, cache=None, reporter=rep, sar=SARMeter(store_dir=tmp_path / name / "sar"),
                                storage=storage)

    return run


@pytest.mark.parametrize("merger_name,params", [("isotropic", {"lam": 0.25, "alpha": 1.0}), ("opcm", {}),
                                                ("isotropic", {"alpha_grid": (0.5, 1.0)}), ("c_tsv_m", {}),
                                                ("c_iso_cts", {})])
def test_disk_store_run_equals_memory_store_run(tiny, tmp_path, merger_name, params):
    run = _runs(tiny, tmp_path, merger_name, params)
    generic = run("a")
    streamed = run("b", storage="disk")
    assert generic["parameter_store"] == "memory" and streamed["parameter_store"] == "disk"
    assert set(generic) == set(streamed)  # one loop, one record
    for key in ("acc_matrix", "expert_acc", "sar", "sar_current", "sar_per_task", "sar_skipped_layers",
                "sar_rank_mean", "sar_scope", "merge_record", "mergeable_bytes", "merger_state_bytes"):
        assert generic[key] == streamed[key], key
    assert generic["sar_scope"] == "seen_tasks"
    if "alpha_grid" in params:
        assert [r["chosen_alpha"] for r in streamed["merge_record"]] == [r["chosen_alpha"] for r in generic["merge_record"]]
        assert all(r["chosen_alpha"] in (0.5, 1.0) for r in streamed["merge_record"])
    final = streamed["deployed"]
    for n, v in generic["deployed"].items():
        assert torch.equal(final[n], v), n
    assert all(0.0 <= s <= 1.0 for s in streamed["sar"])
    for step in streamed["store_steps"]:
        assert step["merge_peak_live_bytes"] < streamed["mergeable_bytes"]


def test_sequential_protocol_is_refused_on_disk(tiny, tmp_path):
    run = _runs(tiny, tmp_path, "swa", {}, protocol="sequential")
    with pytest.raises(UserError, match="independent"):
        run("c", storage="disk")
