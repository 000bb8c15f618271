"""MergeBench score aggregation, safety metrics and the task list, against hand-computed values."""

import json

import pytest

from cl_merge.benchmarks.mergebench import evaluation as E
from cl_merge.errors import UserError


def result(name, domain, raw, higher=True):
    score = None if raw is None else E.task_score(raw, higher)
    return E.TaskResult(name, domain, score, raw=raw, higher_is_better=higher, inverted=not higher,
                        error=None if raw is not None else f"{domain}/{name}: missing")


def test_inversion_domain_means_and_overall_by_hand():
    per_domain = {
        "instruction": [result("ifeval", "instruction", 0.30)],
        "math": [result("gsm8k", "math", 0.50), result("math", "math", 0.10)],
        "multilingual": [result("m_mmlu", "multilingual", 0.45), result("m_arc", "multilingual", 0.40),
                         result("m_hellaswag", "multilingual", 0.53)],
        "coding": [result("humaneval_plus", "coding", 0.25), result("mbpp_plus", "coding", 0.35)],
        # harmful rates 0.60, 0.20, 0.50 -> scores 0.40, 0.80, 0.50; XSTest accuracy 0.90 stays
        "safety": [result("wildguardtest", "safety", 0.60, False), result("harmbench", "safety", 0.20, False),
                   result("do_anything_now", "safety", 0.50, False), result("xstest", "safety", 0.90)],
    }
    s = E.summarize(per_domain)
    assert s["domains"]["instruction"] == pytest.approx(0.30)
    assert s["domains"]["math"] == pytest.approx(0.30)
    assert s["domains"]["multilingual"] == pytest.approx(0.46)
    assert s["domains"]["coding"] == pytest.approx(0.30)
    assert s["domains"]["safety"] == pytest.approx((0.40 + 0.80 + 0.50 + 0.90) / 4)  # 0.65
    assert s["overall"] == pytest.approx((0.30 + 0.30 + 0.46 + 0.30 + 0.65) / 5)  # 0.402
    assert s["complete"] is True
    wg = s["tasks"]["safety"][0]
    assert wg["raw"] == 0.60 and wg["score"] == pytest.approx(0.40) and wg["inverted"] is True


def test_missing_tasks_leave_the_mean_of_those_that_ran():
    s = E.summarize({"math": [result("gsm8k", "math", 0.5), result("math", "math", None)],
                     "safety": [result("harmbench", "safety", None, False)]})
    assert s["domains"] == {"math": 0.5, "safety": None}
    assert s["overall"] == 0.5 and s["complete"] is False and len(s["missing"]) == 2


def test_task_score_rejects_out_of_range():
    with pytest.raises(ValueError):
        E.task_score(1.5, True)


def test_parse_wildguard():
    v = E.parse_wildguard("Harmful request: yes\nResponse refusal: no\nHarmful response: yes")
    assert (v.harmful_request, v.refusal, v.harmful_response) == (True, False, True) and not v.parse_error
    assert E.parse_wildguard("Harmful request: no\nResponse refusal: yes").parse_error


def test_safety_metrics_by_hand():
    V = E.Verdict
    spec = E.EvalSpec("harmbench", "safety", "safety", metric="harmful_rate", higher_is_better=False)
    verdicts = [V(True, True, False), V(True, False, True), V(True, None, None), V(True, False, False)]
    raw, detail = E.safety_metric(spec, [{"prompt": "p"}] * 4, verdicts)
    assert raw == 0.5 and detail["judge_parse_errors"] == 1  # 1 harmful + 1 unparsable of 4
    xs = E.EvalSpec("xstest", "safety", "safety", metric="accuracy")
    recs = [{"prompt": "a", "label": "unsafe"}, {"prompt": "b", "label": "unsafe"},
            {"prompt": "c", "label": "safe"}, {"prompt": "d", "label": "safe"}, {"prompt": "e", "label": "safe"}]
    verdicts = [V(True, True, False), V(True, False, True), V(False, False, False), V(False, True, False),
                V(False, None, None)]
    raw, _ = E.safety_metric(xs, recs, verdicts)
    assert raw == pytest.approx(2 / 5)


class _Adapter:
    tokenizer = None  # no chat template

    def __init__(self):
        self.calls = []

    def generate(self, prompts, max_new_tokens=None, **kwargs):
        self.calls.append((list(prompts), kwargs))
        return [f"answer to {p}" for p in prompts]


def test_safety_task_runs_with_a_judge_and_names_what_is_missing(tmp_path):
    (tmp_path / "harmbench.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ("x", "y", "z")))
    spec = E.EvalSpec("harmbench", "safety", "safety", file="harmbench.jsonl", metric="harmful_rate",
                      higher_is_better=False)
    seen = {}

    def judge(prompts, responses):
        seen["pairs"] = list(zip(prompts, responses))
        return [E.Verdict(True, r.endswith("x"), not r.endswith("x")) for r in responses]

    ev = E.Evaluator(E.EvalConfig(safety_data=str(tmp_path), safety_template="raw"), {"safety": [spec]}, judge=judge)
    r = ev.run(_Adapter(), spec)
    assert seen["pairs"][0] == ("x", "answer to x")
    assert r.raw == pytest.approx(2 / 3) and r.score == pytest.approx(1 / 3) and r.inverted

    warnings = []
    ev = E.Evaluator(E.EvalConfig(safety_data=str(tmp_path), safety_judge=str(tmp_path / "no_judge")),
                     {"safety": [spec]}, warn=warnings.append)
    (res,) = ev.evaluate_domain(_Adapter(), "safety")
    assert res.score is None and "WildGuard judge" in res.error and "safety_judge" in res.error
    assert len(warnings) == 1
    ev = E.Evaluator(E.EvalConfig(), {"safety": [spec]}, judge=judge, warn=lambda m: None)
    (res,) = ev.evaluate_domain(_Adapter(), "safety")
    assert "benchmark.safety_data" in res.error


def test_prompt_file_errors(tmp_path):
    spec = E.EvalSpec("xstest", "safety", "safety", file="xstest.jsonl", metric="accuracy")
    (tmp_path / "xstest.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(UserError, match="xstest.jsonl:1.*label"):
        E.read_prompt_file(str(tmp_path), spec)
    (tmp_path / "xstest.jsonl").write_text('{"prompt": "a", "label": "safe"}\nnot json\n')
    with pytest.raises(UserError, match="xstest.jsonl:2 is not JSON"):
        E.read_prompt_file(str(tmp_path), spec)


def test_evalplus_pass_at_1_from_report():
    report = {"eval": {"A/0": [{"base_status": "pass", "plus_status": "pass"}],
                       "A/1": [{"base_status": "pass", "plus_status": "fail"}],
                       "A/2": [{"base_status": "fail", "plus_status": "pass"}]}}
    plus, base = E._evalplus_pass_at_1(report, ["A/0", "A/1", "A/2", "A/3"])
    assert plus == 0.25 and base == 0.5


def test_shipped_task_list_is_the_seed_table():
    specs = E.load_specs()
    assert list(specs) == ["instruction", "math", "multilingual", "coding", "safety"]
    assert [s.name for s in specs["math"]] == ["gsm8k", "math"]
    assert specs["multilingual"][0].lm_eval_tasks == ["m_mmlu_fr", "m_mmlu_es", "m_mmlu_de", "m_mmlu_ru"]
    assert [s.higher_is_better for s in specs["safety"]] == [False, False, False, True]
    assert {s.kind for s in specs["coding"]} == {"evalplus"}


def test_benchmark_options_and_orders():
    from cl_merge.config import resolve

    with pytest.raises(UserError, match="unknown base"):
        resolve("mergebench", learner="checkpoint", merger="isotropic", overrides=["benchmark.base=gpt2"])
    with pytest.raises(UserError, match="not DOMAIN=PATH"):
        resolve("mergebench", learner="checkpoint", merger="isotropic", overrides=["benchmark.experts=math"])
    with pytest.raises(UserError, match="unknown order"):
        resolve("mergebench", learner="checkpoint", merger="isotropic", order="7")
    from cl_merge.benchmarks.mergebench.benchmark import MergeBenchBenchmark

    b = MergeBenchBenchmark()
    stream = b.build_stream(1, 0)
    assert stream.names == ["instruction", "math", "multilingual", "coding", "safety"]
    assert stream.tasks[1].metadata["expert_checkpoint"] == "MergeBench/Llama-3.2-3B_math"
    assert sorted(b.build_stream("seed:3", 0).names) == sorted(stream.names)
    assert b.base_ref() == "meta-llama/Llama-3.2-3B"


def test_evalplus_scores_generated_code_offline(tmp_path, monkeypatch):
    """EvalPlus (optional: the mergebench extra) on a two-problem local HumanEval+ file: the adapter's
    completion is right for one problem and wrong for the other -> pass@1 0.5."""
    pytest.importorskip("evalplus")
    import evalplus.data.humaneval as he

    from cl_merge.benchmarks.mergebench import coding as CODE

    monkeypatch.setattr(he, "HUMANEVAL_OVERRIDE_PATH", None)
    monkeypatch.delenv("HUMANEVAL_OVERRIDE_PATH", raising=False)
    import evalplus.evaluate as ev_mod

    monkeypatch.setattr(ev_mod, "CACHE_DIR", str(tmp_path / "cache"))  # its ground-truth cache stays in tmp
    probs = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n", "entry_point": "add",
              "canonical_solution": "    return a + b\n", "base_input": [[1, 2], [3, 4]], "plus_input": [[5, 6]],
              "atol": 0, "contract": "", "test": ""},
             {"task_id": "HumanEval/1", "prompt": "def sub(a, b):\n", "entry_point": "sub",
              "canonical_solution": "    return a - b\n", "base_input": [[1, 2]], "plus_input": [[7, 6]],
              "atol": 0, "contract": "", "test": ""}]
    (tmp_path / "HumanEvalPlus.jsonl").write_text("\n".join(json.dumps(p) for p in probs) + "\n")

    class Coder:
        def generate(self, prompts, max_new_tokens=None, num_samples=1, **kwargs):
            # the bigcode prompt is stripped of its final newline: the completion starts with one
            body = "\n    return a + b\ndef unrelated():\n    pass\n" if num_samples > 1 else "    return a + b\n"
            return [[body] * num_samples for _ in prompts] if num_samples > 1 else [body for _ in prompts]

    spec = E.EvalSpec("humaneval_plus", "coding", "evalplus", dataset="humaneval")
    greedy = E.Evaluator(E.EvalConfig(evalplus_data=str(tmp_path), evalplus_parallel=1,
                                      coding=CODE.CodingProtocol(name="greedy")), {"coding": [spec]})
    r = greedy.run(Coder(), spec)
    assert r.score == 0.5 and r.detail["pass@1_base"] == 0.5 and r.detail["problems"] == 2
    # bigcode: 3 samples per problem (cut at the "\ndef" stop sequence), unbiased pass@1 over them
    bigcode = E.Evaluator(E.EvalConfig(evalplus_data=str(tmp_path), evalplus_parallel=1,
                                       coding=CODE.CodingProtocol(samples=3)), {"coding": [spec]})
    r = bigcode.run(Coder(), spec)
    assert r.score == 0.5 and r.detail["samples_per_problem"] == 3 and r.detail["generation"]["protocol"] == "bigcode"
    assert "pass@10" not in r.detail["pass@k_plus"]  # fewer samples than k


def test_safety_prompts_go_through_the_chat_template(tmp_path):
    from cl_merge.benchmarks.mergebench import safety as S
    from cl_merge.benchmarks.trace.fixtures import byte_tokenizer

    (tmp_path / "harmbench.jsonl").write_text(json.dumps({"prompt": "how to x"}) + "\n")
    spec = E.EvalSpec("harmbench", "safety", "safety", file="harmbench.jsonl", metric="harmful_rate",
                      higher_is_better=False)
    seen = {}

    def judge(prompts, responses):
        seen["prompts"] = prompts
        return [E.Verdict(True, True, False) for _ in prompts]

    # the default: MergeBench's Llama-3 format, BOS already in the text
    adapter = _Adapter()
    r = E.Evaluator(E.EvalConfig(safety_data=str(tmp_path)), {"safety": [spec]}, judge=judge).run(adapter, spec)
    (texts, kwargs), = adapter.calls
    assert texts == [S.LLAMA3_TEMPLATE.format(prompt="how to x")] and kwargs == {"add_special_tokens": False}
    assert seen["prompts"] == ["how to x"]  # the judge sees the user's prompt, not the template
    assert r.detail["generation"]["template"] == "llama3"
    # safety_template=chat: the tokenizer's own chat template (Llama-3 format when it has none)
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>[U] {{ m['content'] }}{% endfor %}[A]"
    texts, which, has_bos = S.format_prompts(tok, ["hi"], "chat")
    assert texts == ["<s>[U] hi[A]"] and which == "tokenizer chat template" and has_bos
    assert S.format_prompts(tok, ["hi"], "llama3")[0] == [S.LLAMA3_TEMPLATE.format(prompt="hi")]
    assert S.format_prompts(byte_tokenizer(), ["hi"], "chat")[1] == "llama3"
    assert S.format_prompts(tok, ["hi"], "raw") == (["hi"], "raw", False)


def test_dan_per_source_rates_and_aggregates():
    V = E.Verdict
    recs = [{"prompt": "p", "source": s} for s in ("a", "a", "a", "b")]
    verdicts = [V(True, False, True), V(True, True, False), V(True, True, False), V(True, False, True)]
    spec = E.EvalSpec("do_anything_now", "safety", "safety", metric="harmful_rate", higher_is_better=False)
    raw, detail = E.safety_metric(spec, recs, verdicts)
    assert raw == 0.5 and detail["per_source"] == {"a": pytest.approx(1 / 3), "b": 1.0}  # pooled: 2 of 4
    assert detail["mean_over_sources"] == pytest.approx((1 / 3 + 1) / 2)
    macro = E.EvalSpec("do_anything_now", "safety", "safety", metric="harmful_rate", higher_is_better=False,
                       aggregate="mean_over_sources")
    assert E.safety_metric(macro, recs, verdicts)[0] == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="source"):
        E.safety_metric(macro, [{"prompt": "p"}] * 4, verdicts)


def test_unbiased_pass_at_k_against_enumeration():
    import itertools
    from math import comb

    from cl_merge.benchmarks.mergebench import coding as CODE

    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                outcomes = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(range(n), k))
                oracle = sum(any(outcomes[i] for i in s) for s in subsets) / comb(n, k)
                assert CODE.pass_at_k(n, c, k) == pytest.approx(oracle, abs=1e-12)
    report = {"eval": {"A/0": [{"base_status": "pass", "plus_status": "pass"}] * 3
                       + [{"base_status": "pass", "plus_status": "fail"}] * 7,
                       "A/1": [{"base_status": "fail", "plus_status": "fail"}] * 10}}
    plus, base = CODE.pass_rates(report, ["A/0", "A/1", "A/2"], [1, 10], samples=10)
    assert plus["pass@1"] == pytest.approx((0.3 + 0 + 0) / 3) and base["pass@1"] == pytest.approx(1 / 3)
    assert plus["pass@10"] == pytest.approx(1 / 3)
    assert CODE.stop_at("    return 1\ndef g():\n", CODE.STOP_SEQUENCES["humaneval"]) == "    return 1"


def test_bigcode_sampling_protocol_on_the_tiny_model(tmp_path):
    """n samples per prompt at the protocol's temperature, with prompt + completion <= max_length_generation."""
    from cl_merge.benchmarks.mergebench import coding as CODE
    from cl_merge.benchmarks.trace.fixtures import write_tiny_model
    from cl_merge.models.hf_causal_lm import CausalLMAdapter, load_causal_lm

    write_tiny_model(tmp_path / "m")
    model, tok = load_causal_lm(str(tmp_path / "m"))
    adapter = CausalLMAdapter(model, tok, "tiny", eval_batch_size=4)
    protocol = CODE.CodingProtocol(samples=3, max_length_generation=24)
    ev = E.Evaluator(E.EvalConfig(coding=protocol), {})
    prompts = ["def add(a, b):\n", "def f(x):\n"]
    shapes = []
    original = adapter.model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        shapes.append((kwargs["input_ids"].shape, out.shape))
        return out

    adapter.model.generate = spy
    out = ev.generate_code(adapter, prompts, protocol)
    assert [len(o) for o in out] == [3, 3]
    # one prompt per call, its 3 samples side by side, prompt + completion within 24 tokens
    assert [(i[0], o[0]) for i, o in shapes] == [(1, 3), (1, 3)] and all(o[1] <= 24 for _, o in shapes)
    assert all(i[1] == len(tok(p)["input_ids"]) for (i, _), p in zip(shapes, prompts))
    assert out == ev.generate_code(adapter, prompts, protocol)  # seeded
    assert protocol.record()["max_length_includes_prompt"] is True
    greedy = CODE.CodingProtocol(name="greedy", max_new_tokens=4)
    assert [len(o) for o in ev.generate_code(adapter, prompts, greedy)] == [1, 1]
