"""MergeBench's streamed merging: every merger, through the real checkpoint path, equals the in-memory
merge, and a step holds far less than base + previous + expert."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from _mergebench import DOMAINS, write_tiny_mergebench
from cl_merge.errors import UserError
from cl_merge.registry import LEARNERS, MERGERS
from cl_merge.streaming import LiveTensors, TensorSource, TensorWriter, checkpoint_files, streamed_kth_smallest_abs
from cl_merge.streaming_merge import MergeStep, stream_merge
from cl_merge.task import Task

MERGER_CASES = [
    ("task_arithmetic", {"alpha": 0.3}), ("swa", {}), ("identity", {}), ("magmax", {"alpha": 0.5}),
    ("isotropic", {"lam": 0.25, "alpha": 1.0}), ("ties", {"variant": "seed"}),
    ("ties", {"variant": "seed", "trim_scope": "tensor"}), ("ties", {"variant": "fusionbench"}),
    ("opcm", {"alpha": 0.5}),
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
    assert covered == set(MERGERS.names())


@pytest.mark.parametrize("name,params", MERGER_CASES, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p in MERGER_CASES])
def test_streamed_merge_equals_in_memory_merge(tiny, tmp_path, name, params):
    names = mergeable_names(tiny)
    learner = LEARNERS.get("checkpoint")()  # the real expert source: task metadata -> checkpoint folder
    tracker = LiveTensors()
    base = TensorSource(tiny / "base", names=names, dtype=torch.float32, tracker=tracker)
    theta0 = {n: base[n].clone() for n in names}
    model_bytes = sum(v.numel() * v.element_size() for v in theta0.values())
    reference, streamed = MERGERS.get(name)(**params), MERGERS.get(name)(**params)
    reference.reset(theta0)
    deployed = dict(theta0)
    previous, state = base, None
    for t, domain in enumerate(DOMAINS, start=1):
        task = domain_task(tiny, domain)
        expert_mem = learner.fit(theta0, type("Ctx", (), {"task": task})())  # in-memory expert
        deployed = reference.merge(base=theta0, previous=deployed, expert=expert_mem, start=theta0, step=t)
        del expert_mem
        expert = learner.open_expert(task, names, dtype=torch.float32, tracker=tracker)
        out, new_state = tmp_path / f"deployed-{t}.safetensors", tmp_path / f"state-{t}.safetensors"
        tracker.reset_peak()
        stream_merge(streamed, MergeStep(names, base, previous, expert, base, t, out, state, new_state,
                                         tracker=tracker))
        # memory: a step never holds more than base + previous + expert; in fact a few tensors of one layer
        assert tracker.peak <= 3 * model_bytes
        assert tracker.peak < model_bytes
        previous, state = TensorSource(out, names=names, tracker=tracker), new_state
        for n in names:
            torch.testing.assert_close(previous[n], deployed[n], rtol=1e-6, atol=1e-7)


def test_streamed_kth_matches_kthvalue():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(50, 7, generator=g), torch.zeros(30), torch.randn(13, generator=g).round(decimals=1)]
    flat = torch.cat([t.reshape(-1).abs() for t in tensors])
    for k in (1, 2, 30, 31, 100, 200, flat.numel()):
        assert float(streamed_kth_smallest_abs(lambda: iter(tensors), k)) == float(flat.kthvalue(k).values)


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


def test_unknown_merger_has_no_streaming_path(tiny, tmp_path):
    from cl_merge.merger import Merger

    class Odd(Merger):
        name = "odd"

    names = mergeable_names(tiny)
    base = TensorSource(tiny / "base", names=names)
    with pytest.raises(UserError, match="no layer-by-layer"):
        stream_merge(Odd(), MergeStep(names, base, base, base, base, 1, tmp_path / "o", None, tmp_path / "s"))


def _probe_evaluator(adapter, task, split):
    """A cheap deterministic score in [0, 1] that depends on every weight: the probability the model gives
    to the next byte of a fixed text, averaged."""
    tok = adapter.tokenizer
    ids = torch.tensor([tok(f"domain {task.name}: 12345")["input_ids"]])
    with torch.no_grad():
        logp = adapter.model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(logp.gather(1, ids[0, 1:, None]).exp().mean())


@pytest.mark.parametrize("merger_name,params", [("isotropic", {"lam": 0.25, "alpha": 1.0}), ("opcm", {})])
def test_streaming_protocol_equals_generic_protocol(tiny, tmp_path, merger_name, params):
    from cl_merge.checkpoint import Checkpointer
    from cl_merge.models.hf_causal_lm import CausalLMAdapter, load_causal_lm
    from cl_merge.progress import Reporter
    from cl_merge.protocol import run_protocol
    from cl_merge.streaming_protocol import run_streaming_protocol
    from cl_merge.task import Stream

    def stream():
        tasks = [domain_task(tiny, d) for d in DOMAINS]
        for t in tasks:
            t.evaluator = _probe_evaluator
        return Stream("mergebench", tasks, order=1, seed=0)

    def adapter():
        model, tok = load_causal_lm(str(tiny / "base"))
        return CausalLMAdapter(model, tok, "tiny")

    learner = LEARNERS.get("checkpoint")()
    with Reporter(enabled=False) as rep:
        generic = run_protocol(stream=stream(), adapter=adapter(), learner=learner, learner_name="checkpoint",
                               merger=MERGERS.get(merger_name)(**params), protocol="independent", seed=0,
                               eval_unseen=True, checkpointer=Checkpointer(tmp_path / "a", "x"), resume=False,
                               cache=None, reporter=rep)
        streamed = run_streaming_protocol(stream=stream(), adapter=adapter(), learner=learner,
                                          merger=MERGERS.get(merger_name)(**params), protocol="independent",
                                          checkpointer=Checkpointer(tmp_path / "b", "x"), resume=False,
                                          reporter=rep, base_path=tiny / "base", sar=True,
                                          expert_eval_full=False)
    for row_a, row_b in zip(generic["acc_matrix"], streamed["acc_matrix"]):
        assert row_a == pytest.approx(row_b, rel=1e-5, abs=1e-7)
    assert generic["expert_acc"] == pytest.approx(streamed["expert_acc"], rel=1e-5)
    final = TensorSource(streamed["deployed_path"])
    for n, v in generic["deployed"].items():
        torch.testing.assert_close(final[n], v, rtol=1e-6, atol=1e-7)
    assert all(0.0 <= s <= 1.0 for s in streamed["sar"])
    for step in streamed["streaming"]:
        assert step["merge_peak_live_bytes"] < streamed["mergeable_bytes"]


def test_sequential_protocol_is_refused(tiny, tmp_path):
    from cl_merge.checkpoint import Checkpointer
    from cl_merge.streaming_protocol import run_streaming_protocol

    with pytest.raises(UserError, match="independent"):
        run_streaming_protocol(stream=None, adapter=None, learner=None, merger=None, protocol="sequential",
                               checkpointer=Checkpointer(tmp_path, "x"), resume=False, reporter=None,
                               base_path=tiny / "base")
