"""TRACE stream + Hugging Face causal-LM adapter, offline: metrics against hand-computed values and
published worked examples, the answer-token loss mask, the loader on malformed files, and end-to-end
runs of every learner/merger on a tiny random Llama over synthetic TRACE-format tasks."""

import json

import pytest
import torch

from cl_merge.benchmarks.trace import fixtures as F
from cl_merge.benchmarks.trace import metrics as M
from cl_merge.benchmarks.trace.benchmark import OFFICIAL_ORDER, SETTINGS, TraceBenchmark
from cl_merge.config import resolve
from cl_merge.errors import UserError
from cl_merge.models.hf_causal_lm import CausalLMAdapter
from cl_merge.runner import execute

TASKS = "C-STANCE,ScienceQA,MeetingBank,Py150,20Minuten"


# ---- metrics: hand-computed values --------------------------------------------------------------

def test_exact_match_and_first_char():
    assert M.METRICS["accuracy"]([" yes\n", "no", ""], ["yes", "yes", "yes"]) == pytest.approx(1 / 3)
    # empty predictions score 0 and count in the mean, even against an empty reference
    assert M.METRICS["accuracy"](["", "a"], ["", "a"]) == pytest.approx(0.5)
    assert M.METRICS["first_char_accuracy"](["Answer: B\nBecause x", "B. the second", "  C", "  "],
                                            ["B", "Answer: B", "D", "A"]) == pytest.approx(0.5)


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_hand_computed():
    # tokens: the cat sat on the mat | the cat was on the mat -> LCS "the cat on the mat" = 5
    p, r = "The cat sat on the mat.", "the cat was on the mat"
    assert M.rouge_l(p, r) == pytest.approx(2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6))
    # unequal lengths: pred 3 tokens, ref 5, LCS 2 -> P 2/3, R 2/5
    assert M.rouge_l("a b z", "a x b y w") == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert M.rouge_l("", "a b") == 0.0
    # a long single sentence (the `rouge` package TRACE uses fails on these)
    long = " ".join(f"w{i}" for i in range(1000))
    assert M.rouge_l(long, long) == pytest.approx(1.0)


def test_edit_similarity_with_trace_literal_normalisation():
    assert M.normalise_code("x = <NUM_LIT> + <STR_LIT> <CHAR_LIT> <NUM_LIT:3> '<STR_LIT:a b>'") == "x = 0 +   3 'a b'"
    pred, ref = "return foo ( <NUM_LIT:1> )", "return bar ( 1 )"
    a, b = "return foo ( 1 )", "return bar ( 1 )"
    assert M.edit_similarity(pred, ref) == pytest.approx(2 * _lcs(a, b) / (len(a) + len(b)))
    assert M.edit_similarity("kitten", "sitting") == pytest.approx(2 * 4 / 13)  # LCS "ittn"
    assert M.edit_similarity("   ", "x") == 0.0
    assert M.METRICS["edit_similarity"](["abc", ""], ["abc", "abc"]) == pytest.approx(0.5)


def test_sari_published_examples():
    # Hugging Face `sari` metric card / docstring (Xu et al. 2016 metric): 26.953601953601954 and 100
    refs = [["About 95 species are currently known .", "About 95 species are now accepted .",
             "95 species are now accepted ."]]
    got = M.sari(["About 95 you now get in ."], refs, ["About 95 species are currently accepted ."])
    assert 100 * got == pytest.approx(26.953601953601954, abs=1e-9)
    # the card's variant without spaces before the period: 13a tokenisation gives the same score
    got = M.sari(["About 95 you now get in."], [[r.replace(" .", ".") for r in refs[0]]],
                 ["About 95 species are currently accepted."])
    assert 100 * got == pytest.approx(26.953601953601954, abs=1e-9)
    same = "About 95 species are currently accepted ."
    assert M.sari([same], [[same]], [same]) == pytest.approx(1.0)


def test_sari_hand_computed():
    # source "a b c", prediction "a b d", reference "a d".
    # 1-grams: keep {a,b}: good a -> P 1/2; references keep {a} -> R 1/1; F1 2/3.
    #   delete {c}: c not in reference -> P 1. add {d}: in reference, possible adds {d} -> F1 1.
    # 2-grams: src {ab,bc} cand {ab,bd} ref {ad}: keep {ab} bad -> P 0, keep-possible none -> R 1: F1 0.
    #   delete {bc}: good -> 1. add {bd}: not in ref -> P 0; possible {ad} -> R 0: F1 0.
    # 3-grams: src {abc} cand {abd} ref {}: keep none -> P 1, R 1 -> 1; delete {abc} -> 1; add {abd}: P 0, R 1 -> 0.
    # 4-grams: all empty -> keep 1, delete 1, add 1.
    keep = (2 / 3 + 0 + 1 + 1) / 4
    delete = (1 + 1 + 1 + 1) / 4
    add = (1 + 0 + 0 + 1) / 4
    assert M.sari_sentence("a b c", "a b d", ["a d"]) == pytest.approx((keep + delete + add) / 3)
    assert M.sari(["", "a b d"], ["a d", "a d"], ["a b c", "a b c"]) == pytest.approx((keep + delete + add) / 6)


# ---- the adapter: answer-token loss mask ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (~216k parameters) + byte-level tokenizer, saved like a hub checkpoint,
    and five synthetic TRACE-format tasks (one per metric type, conflicting rules)."""
    root = tmp_path_factory.mktemp("trace")
    F.write_tiny_model(root / "model")
    F.write_synthetic_tasks(root / "data", n_train=64, n_eval=4, n_test=8)
    return root


def adapter_for(tiny, **kw):
    from cl_merge.models.hf_causal_lm import load_causal_lm

    model, tok = load_causal_lm(str(tiny / "model"))
    return CausalLMAdapter(model, tok, "tiny", **kw)


def test_loss_is_on_answer_tokens_only(tiny):
    adapter = adapter_for(tiny)
    tok = adapter.tokenizer
    batch = [{"prompt": "Q: ab\n", "answer": "xyz"}, {"prompt": "Question: a longer one\n", "answer": "k"}]
    ids, mask, labels = adapter.collate(batch)
    for i, r in enumerate(batch):
        p = tok(r["prompt"])["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p) + len(a)
        assert ids[i, :n].tolist() == p + a and mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert labels[i].tolist() == [-100] * len(p) + a + [-100] * (ids.shape[1] - n)
    # the loss equals a hand-computed mean cross-entropy over the 3+1 and 1+1 answer tokens
    with torch.no_grad():
        logits = adapter.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, -1)
        terms = [-logp[i, j - 1, labels[i, j]] for i in range(2) for j in range(ids.shape[1]) if labels[i, j] != -100]
        assert len(terms) == 6
        assert float(adapter.loss(batch, None)) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    # the answer tokens' loss reaches every mergeable weight
    loss = adapter.loss(batch, None)
    loss.backward()
    params = adapter.trainable_parameters()
    assert all(p.grad is not None for p in params.values())
    # mergeable = everything but the token embeddings and the LM head (default)
    assert not any("embed_tokens" in n or "lm_head" in n for n in params)
    assert {"model.norm.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(params)
    assert "lm_head.weight" in adapter_for(tiny, include_embeddings=True).trainable_parameters()


def test_truncation_keeps_bos_and_answer(tiny):
    adapter = adapter_for(tiny, max_length=12)
    ids, labels = adapter.encode("p" * 40, "abc")
    assert len(ids) == 12 and ids[0] == adapter.tokenizer.bos_token_id
    assert [x for x in labels if x != -100] == ids[-4:]


def test_generation_left_pads_and_records_decoding(tiny):
    adapter = adapter_for(tiny, eval_batch_size=4)
    prompts = ["a", "a much longer prompt"]
    together = adapter.generate(prompts, max_new_tokens=5)
    alone = [adapter.generate([p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone  # left padding: batched greedy = one at a time
    assert adapter.decoding()["strategy"] == "greedy"
    sampler = adapter_for(tiny, temperature=0.7, generation_seed=3)
    assert sampler.generate(prompts, 5) == sampler.generate(prompts, 5)  # seeded sampling
    assert sampler.decoding()["temperature"] == 0.7


# ---- the loader on malformed files --------------------------------------------------------------

def _write_task(root, task="FOMC", train=None, raw=None):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    good = [{"prompt": "p", "answer": "a"}]
    for split in ("train", "eval", "test"):
        (folder / f"{split}.json").write_text(json.dumps(good))
    if raw is not None:
        (folder / "train.json").write_text(raw)
    elif train is not None:
        (folder / "train.json").write_text(json.dumps(train))
    return folder


@pytest.mark.parametrize("content, expected", [
    ([{"prompt": "p"}], r"train\.json: record 0 has no \"answer\" field"),
    ([{"prompt": "p", "answer": "a"}, {"prompt": 3, "answer": "a"}], r"train\.json: record 1 field \"prompt\" is a JSON int"),
    ([], r"train\.json: the list of records is empty"),
    ({"prompt": "p", "answer": "a"}, r"train\.json: expected a JSON list"),
    ([["p", "a"]], r"train\.json: record 0 is a JSON list"),
])
def test_loader_names_file_and_record(tmp_path, content, expected):
    _write_task(tmp_path, train=content)
    with pytest.raises(UserError, match=expected):
        TraceBenchmark(data_dir=str(tmp_path), tasks=("FOMC",)).build_task("FOMC")


def test_loader_missing_and_broken_data(tmp_path):
    with pytest.raises(UserError, match="benchmark.data_dir is not set: download TRACE"):
        TraceBenchmark().build_task("FOMC")
    with pytest.raises(UserError, match=r"TRACE task folder .*FOMC is missing.*data_dir=DIR"):
        TraceBenchmark(data_dir=str(tmp_path)).build_task("FOMC")
    _write_task(tmp_path, raw='[{"prompt": "p", "answer": }]')
    with pytest.raises(UserError, match=r"train\.json: invalid JSON at line 1 column"):
        TraceBenchmark(data_dir=str(tmp_path)).build_task("FOMC")
    (tmp_path / "FOMC" / "test.json").unlink()
    _write_task(tmp_path)
    (tmp_path / "FOMC" / "eval.json").unlink()
    with pytest.raises(UserError, match=r"eval\.json is missing"):
        TraceBenchmark(data_dir=str(tmp_path)).build_task("FOMC")
    with pytest.raises(UserError, match="has no TRACE metric"):
        TraceBenchmark(data_dir=str(tmp_path)).build_task("NewTask")


def test_settings_caps_and_orders(tiny):
    assert SETTINGS["trace8"] == OFFICIAL_ORDER and len(OFFICIAL_ORDER) == 8
    assert list(SETTINGS["seed7"]) == [t for t in OFFICIAL_ORDER if t != "Py150"]
    bench = TraceBenchmark(data_dir=str(tiny / "data"), tasks=tuple(TASKS.split(",")), max_train=10, max_test=3)
    stream = bench.build_stream(1, 0)
    assert stream.names == TASKS.split(",")
    assert [len(t.train) for t in stream] == [10] * 5 and [len(t.test) for t in stream] == [3] * 5
    assert sorted(bench.build_stream("seed:1", 0).names) == sorted(TASKS.split(","))
    with pytest.raises(UserError, match="unknown order"):
        bench.resolve_order(2)


# ---- end to end ---------------------------------------------------------------------------------

def run(tiny, tmp_path, name, extra=(), **kw):
    cfg = resolve("trace", overrides=[
        f"benchmark.model={tiny / 'model'}", f"benchmark.data_dir={tiny / 'data'}", *extra,
        "run.sar=false", f"run.cache_dir={tiny / 'cache'}"], **kw)
    result, _ = execute(cfg, out_dir=tmp_path / name, progress=False)
    return result


def test_cft_forgets_and_saim_runs(tiny, tmp_path):
    extra = [f"benchmark.tasks={TASKS}", "learner.steps=60", "learner.lr=3e-3"]
    results = {s: run(tiny, tmp_path, s, extra, strategy=s) for s in ("c-ft", "saim")}
    for r in results.values():
        assert len(r["acc_matrix"]) == 6 and all(len(row) == 5 for row in r["acc_matrix"])
        assert all(0.0 <= v <= 1.0 for row in r["acc_matrix"] for v in row)
        assert r["bwt_denominator"] == 4 and len(r["expert_acc"]) == 5
        detail = r["benchmark_detail"]
        assert detail["task_metrics"] == {"C-STANCE": "accuracy", "ScienceQA": "first_char_accuracy",
                                          "MeetingBank": "rouge_l", "Py150": "edit_similarity", "20Minuten": "sari"}
        assert detail["decoding"]["strategy"] == "greedy" and r["hyperparameters"]["benchmark.temperature"] == 0.0
        # TRACE's own scoring rules and decoding by default, recorded with the scorer versions
        assert detail["scoring"] == "reference" and detail["decoding"]["clean_up_tokenization_spaces"] is False
        assert detail["scorer_versions"]["rouge"] == "1.0.1" and "rouge_fallbacks" in detail
    cft = results["c-ft"]
    assert cft["bwt"] < -0.2, cft["acc_matrix"]
    # the experts learned their rule (the untrained model's row 0 is near 0 on the exact-match tasks)
    assert cft["expert_acc"][0] > cft["acc_matrix"][0][0] + 0.5


def test_every_learner_and_merger_runs_on_the_lm(tiny, tmp_path):
    extra = ["benchmark.tasks=C-STANCE,20Minuten", "benchmark.max_train=16", "benchmark.max_test=2",
             "benchmark.max_new_tokens=6", "learner.steps=3", "learner.batch_size=4", "learner.lr=1e-3"]
    for learner in ("adam", "sa_bcd", "sam", "ewc", "er"):
        r = run(tiny, tmp_path, learner, extra, learner=learner, merger="identity", protocol="sequential")
        assert len(r["acc_matrix"]) == 3
    from cl_merge.registry import MERGERS

    for merger in [m for m in MERGERS.names() if "independent" in MERGERS.get(m).protocols]:
        r = run(tiny, tmp_path, merger, extra, learner="adam", merger=merger, protocol="independent")
        assert len(r["acc_matrix"]) == 3 and all(0.0 <= v <= 1.0 for v in r["acc_matrix"][2])
