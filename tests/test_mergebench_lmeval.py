"""lm-eval run for real on the tiny model with a local task (JSON data + YAML written here), no download;
and the whole mergebench run (streamed merge + lm-eval scoring + results JSON) through the runner."""

import json

import pytest

from _mergebench import write_tiny_mergebench

pytest.importorskip("lm_eval")

PROMPTS = ["Q: 1+1?\nA:", "Q: colour of sky?\nA:", "Q: capital of France?\nA:", "Q: 2*3?\nA:",
           "Q: a b c?\nA:", "Q: hello?\nA:"]


def write_task(folder, targets, name="tiny_qa"):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.json"
    data.write_text(json.dumps([{"question": p, "answer": t} for p, t in zip(PROMPTS, targets)]))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_mergebench(tmp_path_factory.mktemp("mb"), domains=("instruction", "math"))


def test_lm_eval_generates_and_scores_on_the_tiny_model(tiny, tmp_path):
    from cl_merge.benchmarks.mergebench.evaluation import EvalConfig, EvalSpec, Evaluator
    from cl_merge.models.hf_causal_lm import CausalLMAdapter, load_causal_lm

    model, tok = load_causal_lm(str(tiny / "base"))
    adapter = CausalLMAdapter(model, tok, "tiny", eval_batch_size=1)
    spec = EvalSpec(name="qa", domain="math", kind="lm_eval", task="tiny_qa", metric="exact_match,none")

    # 1) targets nobody can generate in 6 bytes: score 0, and the greedy answers are logged
    never = ["@@never@@"] * len(PROMPTS)
    ev = Evaluator(EvalConfig(batch_size=1, include_path=str(write_task(tmp_path / "t1", never)), builtin_tasks=False,
                              lm_eval_log_samples=True), {"math": [spec]})
    result = ev.run(adapter, spec)
    assert result.score == 0.0 and result.raw == 0.0
    samples = result.detail["samples"]["tiny_qa"]
    by_doc = {s["doc_id"]: s["filtered_resps"][0] for s in samples}
    answers = [by_doc[i] for i in range(len(PROMPTS))]
    assert any(a for a in answers)  # the model generated text

    # 2) the greedy answers of half the prompts become their targets: exactly 0.5
    targets = [a if i % 2 == 0 else "@@never@@" for i, a in enumerate(answers)]
    ev = Evaluator(EvalConfig(batch_size=1, include_path=str(write_task(tmp_path / "t2", targets)), builtin_tasks=False),
                   {"math": [spec]})
    assert ev.run(adapter, spec).score == pytest.approx(0.5)

    # 3) an unknown task is a missing requirement with its name, and the domain still reports
    bad = EvalSpec(name="nope", domain="math", kind="lm_eval", task="no_such_task_xyz", metric="acc,none")
    ev = Evaluator(EvalConfig(batch_size=1, include_path=str(tmp_path / "t2"), builtin_tasks=False), {"math": [spec, bad]},
                   warn=lambda m: None)
    results = ev.evaluate_domain(adapter, "math")
    assert results[0].score == pytest.approx(0.5)
    assert results[1].score is None and "no_such_task_xyz" in results[1].error


def test_mergebench_run_end_to_end(tiny, tmp_path):
    from cl_merge.config import resolve
    from cl_merge.runner import execute

    task_dir = write_task(tmp_path / "tasks", ["@@never@@"] * len(PROMPTS))
    spec = {"domains": {d: [{"name": "qa", "kind": "lm_eval", "task": "tiny_qa", "metric": "exact_match,none"}]
                        for d in ("instruction", "math", "multilingual", "coding", "safety")}}
    # math also has a safety-style task whose data is missing: named in the results, the rest runs
    spec["domains"]["math"].append({"name": "harmbench", "kind": "safety", "file": "harmbench.jsonl",
                                    "metric": "harmful_rate", "higher_is_better": False})
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    config = resolve("mergebench", learner="checkpoint", merger="task_arithmetic", overrides=[
        f"benchmark.base_path={tiny / 'base'}", "benchmark.num_tasks=2",
        f"benchmark.experts=instruction={tiny / 'instruction'},math={tiny / 'math'}",
        f"benchmark.eval_tasks={tmp_path / 'tasks.json'}", f"benchmark.include_path={task_dir}",
        "benchmark.lm_eval_builtin_tasks=false",
        "benchmark.max_new_tokens=8", "run.eval_unseen=false", "run.eval_batch_size=2",
        f"benchmark.save_merged={tmp_path / 'final.safetensors'}"])
    result, path = execute(config, out_dir=tmp_path / "runs", progress=False)
    assert result["tasks"] == ["instruction", "math"]
    assert result["acc_matrix"] == [[0.0, 0.0], [0.0, None], [0.0, 0.0]]
    assert result["acc"] == 0.0 and result["expert_source"][0].startswith("checkpoint:")
    detail = result["benchmark_detail"]["mergebench"]
    math_eval = [e for e in detail["evaluations"] if e["domain"] == "math"][0]
    assert math_eval["complete"] is False
    assert "safety_data" in [t for t in math_eval["tasks"] if t["name"] == "harmbench"][0]["error"]
    assert len(detail["streaming"]) == 2 and detail["overall_per_row"][-1] == 0.0
    # every setting that decides a number is in the results
    protocol = detail["evaluation_protocol"]
    assert protocol["coding"]["protocol"] == "bigcode" and protocol["coding"]["samples"] == 10
    assert protocol["coding"]["temperature"] == 0.2 and protocol["coding"]["max_length_generation"] == 512
    assert protocol["safety"]["template"] == "llama3" and protocol["metric_keys"]["qa"]["metric"] == "exact_match,none"
    assert {"lm_eval", "evalplus", "rouge", "rapidfuzz"} <= set(detail["scorer_versions"])
    assert detail["scorer_versions"]["lm_eval"] is not None
    qa = [t for t in math_eval["tasks"] if t["name"] == "qa"][0]
    assert qa["detail"]["all_metrics"]["tiny_qa"] == {"exact_match,none": 0.0}
    assert (tmp_path / "final.safetensors").is_file()
    assert json.loads(path.read_text())["benchmark"] == "mergebench"
