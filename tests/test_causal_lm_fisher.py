"""The causal-LM adapter's functional per-sample loss: the vmap Fisher diagonal equals a per-sample
backward loop through the adapter's own training loss, on the tiny random Llama of the TRACE tests
(records of different lengths, so rows are right-padded inside a batch)."""

import torch

from cl_merge.benchmarks.trace.fixtures import byte_tokenizer, tiny_llama
from cl_merge.fisher import FisherSettings, fisher_diagonal
from cl_merge.models.hf_causal_lm import CausalLMAdapter
from cl_merge.task import Task


def _adapter():
    tok = byte_tokenizer()
    return CausalLMAdapter(tiny_llama(len(tok), 0, hidden=32, layers=2), tok, "tiny", max_length=48)


def _task(n=7):
    records = [{"prompt": f"question {i}: what is {i} plus {i * 3}?" + " pad" * (i % 3), "answer": str(4 * i)}
               for i in range(n)]
    return Task(name="sums", classnames=(), templates=(), train=records, val=[], test=[], fingerprint="sums")


def test_per_sample_loss_is_the_training_loss_of_one_record():
    adapter, task = _adapter(), _task()
    loss = adapter.per_sample_loss(task)
    params = {k: v.detach() for k, v in adapter.trainable_parameters().items()}
    ids, labels = adapter.collate_samples(task.train)  # right-padded to the longest record
    for i, record in enumerate(task.train):
        with torch.no_grad():
            expected = adapter.loss([record], task)
        assert torch.allclose(loss(params, ids[i], labels[i]), expected, rtol=1e-5, atol=1e-6)


def test_causal_lm_fisher_equals_a_per_sample_backward_loop():
    adapter, task = _adapter(), _task()
    est = fisher_diagonal(adapter, task, settings=FisherSettings(fraction=1.0, min_samples=1, chunk_size=3,
                                                                 batch_size=4))
    assert est.samples == len(task.train)
    params = adapter.trainable_parameters()
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for record in task.train:  # the oracle: one backward pass per record, squared, averaged
        adapter.model.zero_grad()
        adapter.loss([record], task).backward()
        for k, p in params.items():
            expected[k] += p.grad.detach() ** 2 / len(task.train)
    assert set(est.diagonal) == set(params)
    for k in params:
        scale = float(expected[k].abs().max())
        assert scale > 0, k
        assert float((est.diagonal[k] - expected[k]).abs().max()) <= 1e-4 * scale, k
