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
    def generate(self, prompts, max_new_tokens=None):
        return [f"answer to {p}" for p in prompts]


def test_safety_task_runs_with_a_judge_and_names_what_is_missing(tmp_path):
    (tmp_path / "harmbench.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ("x", "y", "z")))
    spec = E.EvalSpec("harmbench", "safety", "safety", file="harmbench.jsonl", metric="harmful_rate",
                      higher_is_better=False)
    seen = {}

    def judge(prompts, responses):
        seen["pairs"] = list(zip(prompts, responses))
        return [E.Verdict(True, r.endswith("x"), not r.endswith("x")) for r in responses]

    ev = E.Evaluator(E.EvalConfig(safety_data=str(tmp_path)), {"safety": [spec]}, judge=judge)
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
        def generate(self, prompts, max_new_tokens=None):
            return ["    return a + b\n" for _ in prompts]

    spec = E.EvalSpec("humaneval_plus", "coding", "evalplus", dataset="humaneval")
    ev = E.Evaluator(E.EvalConfig(evalplus_data=str(tmp_path), evalplus_parallel=1), {"coding": [spec]})
    r = ev.run(Coder(), spec)
    assert r.score == 0.5 and r.detail["pass@1_base"] == 0.5 and r.detail["problems"] == 2
