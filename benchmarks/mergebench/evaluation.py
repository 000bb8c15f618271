"""MergeBench evaluation: per-task scores in [0, 1], domain means, overall mean.

* lm-eval tasks (IFEval, GSM8K, MATH, m_MMLU/ARC/HellaSwag) run through ``lm_eval.simple_evaluate`` on
  an ``HFLM`` that wraps the adapter's live model and tokenizer (no copy; the weights the protocol
  just set are the ones evaluated).
* coding (HumanEval+, MBPP+): MergeBench's bigcode protocol by default (10 samples at T 0.2, top-p
  0.95, 512 tokens including the prompt, unbiased pass@1) or greedy (``coding.py``), scored by
  EvalPlus' own test runner (base + extra tests).
* safety: the adapter answers the prompt sets (local JSONL files) in the Llama-3 chat format
  MergeBench's safety-eval run used, or the base model's own template (``safety.py``); the WildGuard classifier judges each (prompt, response) pair.
  Harmful-response rates are lower-is-better and are inverted (1 − rate) before averaging; the raw
  rate and ``inverted: true`` are recorded with the score.

Which metric key stands for each task is written in ``tasks.json`` with its source (MergeBench's
released result files); every lm-eval metric of a task is recorded beside the chosen one.

A task that cannot run (a gated dataset or judge without credentials, a missing data file, a missing
package) fails with one message naming what is missing; the other tasks still run. A domain's score is
the mean of the tasks that ran (``complete: false`` and the messages are recorded); a domain none of
whose tasks ran scores null.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from cl_merge.errors import UserError

from . import coding as CODE
# the safety names stay importable from here (they lived in this module)
from .safety import (SAFETY_FILES_HELP, WILDGUARD_TEMPLATE, MissingRequirement, Verdict,  # noqa: F401
                     WildGuardJudge, _first_line, format_prompts, parse_wildguard, read_prompt_file,
                     safety_metric)

TASKS_FILE = Path(__file__).with_name("tasks.json")
DOMAINS = ("instruction", "math", "multilingual", "coding", "safety")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    name: str
    domain: str
    kind: str  # lm_eval | evalplus | safety
    description: str = ""
    task: Optional[str] = None  # lm-eval task name ({lang} expands over languages)
    metric: Optional[str] = None  # lm-eval "metric,filter" key, or the safety metric
    num_fewshot: Optional[int] = None
    languages: tuple = ()
    higher_is_better: bool = True
    dataset: Optional[str] = None  # evalplus: humaneval | mbpp
    file: Optional[str] = None  # safety: prompt file name under the safety data folder
    aggregate: str = "pooled"  # safety harmful_rate: pooled over prompts, or mean_over_sources
    source: str = ""  # where the metric choice comes from (MergeBench's released files, its paper)

    @property
    def lm_eval_tasks(self) -> List[str]:
        if self.languages:
            return [self.task.format(lang=lang) for lang in self.languages]
        return [self.task]


@dataclasses.dataclass
class TaskResult:
    name: str
    domain: str
    score: Optional[float]  # in [0, 1], higher is better (inverted where the raw rate is lower-is-better)
    raw: Optional[float] = None  # the metric as the tool reports it
    higher_is_better: bool = True
    inverted: bool = False
    error: Optional[str] = None
    detail: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def load_specs(path: Optional[os.PathLike] = None) -> Dict[str, List[EvalSpec]]:
    """Domain -> its evaluation tasks, from ``tasks.json`` (or a file with the same layout)."""
    path = Path(path) if path else TASKS_FILE
    try:
        data = json.loads(Path(path).read_text())
        domains = data["domains"]
        out: Dict[str, List[EvalSpec]] = {}
        for domain, tasks in domains.items():
            specs = []
            for t in tasks:
                fields = {k: v for k, v in t.items() if k in EvalSpec.__dataclass_fields__}
                fields["languages"] = tuple(fields.get("languages", ()))
                specs.append(EvalSpec(domain=domain, **fields))
            if not specs:
                raise ValueError(f"domain {domain} has no task")
            out[domain] = specs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the MergeBench task list {path}: {exc}") from None
    for specs in out.values():
        for s in specs:
            if s.kind not in ("lm_eval", "evalplus", "safety"):
                raise UserError(f"{path}: task {s.name} has unknown kind {s.kind!r} (lm_eval, evalplus, safety)")
    return out


# ---- aggregation ---------------------------------------------------------------------------------------

def task_score(raw: float, higher_is_better: bool) -> float:
    """A metric as a score in [0, 1] where higher is better: lower-is-better rates become 1 − rate."""
    raw = float(raw)
    if not 0.0 <= raw <= 1.0:
        raise ValueError(f"metric value {raw} is outside [0, 1]")
    return raw if higher_is_better else 1.0 - raw


def domain_score(results: Sequence[TaskResult]) -> Optional[float]:
    """Mean of the scores of the tasks that ran; None if none did."""
    scores = [r.score for r in results if r.score is not None]
    return sum(scores) / len(scores) if scores else None


def overall_score(domain_scores: Dict[str, Optional[float]]) -> Optional[float]:
    """Mean of the domain scores that exist; None if none does."""
    values = [v for v in domain_scores.values() if v is not None]
    return sum(values) / len(values) if values else None


def summarize(per_domain: Dict[str, Sequence[TaskResult]]) -> Dict[str, Any]:
    domains = {d: domain_score(rs) for d, rs in per_domain.items()}
    missing = [r.error for rs in per_domain.values() for r in rs if r.error]
    return {"domains": domains, "overall": overall_score(domains), "complete": not missing,
            "missing": missing,
            "tasks": {d: [r.as_dict() for r in rs] for d, rs in per_domain.items()}}


# ---- configuration ------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 8
    limit: Optional[int] = None  # per lm-eval task / per prompt set; smoke runs only
    include_path: Optional[str] = None  # extra lm-eval task folder (YAML)
    builtin_tasks: bool = True  # index lm-eval's own task folders (off: only include_path; faster)
    apply_chat_template: bool = False
    max_new_tokens: int = 512  # safety generations and greedy coding
    coding: CODE.CodingProtocol = dataclasses.field(default_factory=CODE.CodingProtocol)
    safety_template: str = "llama3"  # llama3 (MergeBench's) | chat (the tokenizer's own) | raw
    safety_data: Optional[str] = None
    safety_judge: str = "allenai/wildguard"
    judge_batch_size: int = 8
    evalplus_data: Optional[str] = None  # folder with HumanEvalPlus.jsonl / MbppPlus.jsonl (else EvalPlus' cache)
    evalplus_parallel: Optional[int] = None
    lm_eval_log_samples: bool = False


class Evaluator:
    """Evaluates an adapter on MergeBench's domains. ``judge`` may be injected (tests); otherwise the
    WildGuard classifier is loaded on first use."""

    def __init__(self, config: EvalConfig, specs: Dict[str, List[EvalSpec]],
                 judge: Optional[Callable[[List[str], List[str]], List["Verdict"]]] = None,
                 warn: Callable[[str], None] = None):
        self.config = config
        self.specs = specs
        self._judge = judge
        self._judge_error: Optional[str] = None
        self._lm = None
        self._lm_model = None
        self._manager = None
        self._warned: set = set()
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))

    # one domain
    def evaluate_domain(self, adapter, domain: str) -> List[TaskResult]:
        results = []
        for spec in self.specs[domain]:
            try:
                results.append(self.run(adapter, spec))
            except MissingRequirement as exc:
                message = f"{domain}/{spec.name}: {exc}"
                if message not in self._warned:
                    self._warned.add(message)
                    self.warn(message)
                results.append(TaskResult(spec.name, domain, None, higher_is_better=spec.higher_is_better,
                                          inverted=not spec.higher_is_better, error=message))
        return results

    def run(self, adapter, spec: EvalSpec) -> TaskResult:
        if spec.kind == "lm_eval":
            raw, detail = self.run_lm_eval(adapter, spec)
        elif spec.kind == "evalplus":
            raw, detail = self.run_evalplus(adapter, spec)
        else:
            raw, detail = self.run_safety(adapter, spec)
        return TaskResult(spec.name, spec.domain, task_score(raw, spec.higher_is_better), raw=raw,
                          higher_is_better=spec.higher_is_better, inverted=not spec.higher_is_better,
                          detail=detail)

    # ---- lm-eval ---------------------------------------------------------------------------------
    def lm(self, adapter):
        try:
            from lm_eval.models.huggingface import HFLM
        except ImportError:
            raise MissingRequirement("lm-eval is not installed (pip install 'cl_merge[mergebench]')") from None
        if self._lm is None or self._lm_model is not adapter.model:
            self._lm = HFLM(pretrained=adapter.model, tokenizer=adapter.tokenizer, batch_size=self.config.batch_size,
                            max_length=getattr(adapter, "max_length", None))
            self._lm_model = adapter.model
        return self._lm

    def run_lm_eval(self, adapter, spec: EvalSpec):
        lm = self.lm(adapter)
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        names = spec.lm_eval_tasks
        if self._manager is None:  # indexing lm-eval's task folders takes seconds: once per run
            self._manager = TaskManager(include_path=self.config.include_path or None,
                                        include_defaults=self.config.builtin_tasks)
        manager = self._manager
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise MissingRequirement(f"lm-eval has no task {', '.join(unknown)} (lm-eval version or include_path)")
        try:
            out = simple_evaluate(model=lm, tasks=names, num_fewshot=spec.num_fewshot, limit=self.config.limit,
                                  task_manager=manager, log_samples=self.config.lm_eval_log_samples,
                                  apply_chat_template=self.config.apply_chat_template, bootstrap_iters=0,
                                  verbosity="ERROR")
        except Exception as exc:  # datasets that cannot be fetched (offline, gated) and the like
            raise MissingRequirement(
                f"lm-eval could not run {', '.join(names)}: {_first_line(exc)} (its dataset must be in the "
                "HF datasets cache or downloadable; gated datasets need `huggingface-cli login`)") from None
        values, every = {}, {}
        for n in names:
            entry = out["results"].get(n) or out.get("groups", {}).get(n) or {}
            if spec.metric not in entry:
                raise MissingRequirement(f"lm-eval result of {n} has no metric {spec.metric} "
                                         f"(has {', '.join(k for k in entry if ',' in k)})")
            values[n] = float(entry[spec.metric])
            every[n] = {k: v for k, v in entry.items() if "," in k and "_stderr" not in k}
        raw = sum(values.values()) / len(values)
        detail = {"lm_eval_tasks": values, "metric": spec.metric, "metric_source": spec.source,
                  "all_metrics": every, "num_fewshot": spec.num_fewshot, "limit": self.config.limit,
                  "apply_chat_template": self.config.apply_chat_template}
        if self.config.lm_eval_log_samples:
            detail["samples"] = {n: out.get("samples", {}).get(n) for n in names}
        return raw, detail

    # ---- EvalPlus -----------------------------------------------------------------------------------
    def run_evalplus(self, adapter, spec: EvalSpec):
        try:
            from evalplus.data import get_human_eval_plus, get_mbpp_plus
            from evalplus.evaluate import evaluate as evalplus_evaluate
            import evalplus.sanitize  # noqa: F401  (greedy extraction)
        except ImportError as exc:
            raise MissingRequirement(f"EvalPlus cannot be imported ({exc}); pip install 'cl_merge[mergebench]' and "
                                     "then pip install --no-deps evalplus") from None
        if self.config.evalplus_data:
            folder = Path(self.config.evalplus_data).expanduser()
            import evalplus.data.humaneval as he
            import evalplus.data.mbpp as mb

            # EvalPlus reads these variables into module constants at import time: set both
            for module, env, file in ((he, "HUMANEVAL_OVERRIDE_PATH", "HumanEvalPlus.jsonl"),
                                      (mb, "MBPP_OVERRIDE_PATH", "MbppPlus.jsonl")):
                if (folder / file).is_file():
                    os.environ[env] = str(folder / file)
                    setattr(module, env, str(folder / file))
        try:
            problems = get_human_eval_plus() if spec.dataset == "humaneval" else get_mbpp_plus()
        except Exception as exc:
            raise MissingRequirement(
                f"EvalPlus data for {spec.dataset} is not available: {_first_line(exc)} (run once with network, or "
                "set benchmark.evalplus_data=DIR holding HumanEvalPlus.jsonl / MbppPlus.jsonl)") from None
        ids = sorted(problems)[: self.config.limit] if self.config.limit else sorted(problems)
        protocol = self.config.coding
        prompts = [CODE.prompt_for(spec.dataset, problems[i]["prompt"], protocol) for i in ids]
        completions = self.generate_code(adapter, prompts, protocol)
        programs = CODE.solutions(spec.dataset, prompts, completions, [problems[i]["entry_point"] for i in ids],
                                  protocol)
        with tempfile.TemporaryDirectory(prefix="cl_merge_evalplus_") as tmp:
            samples = Path(tmp) / "samples.jsonl"
            with open(samples, "w") as f:
                for task_id, codes in zip(ids, programs):
                    for code in codes:
                        f.write(json.dumps({"task_id": task_id, "solution": code}) + "\n")
            result_file = Path(tmp) / "samples_eval_results.json"  # where EvalPlus 0.3 writes for samples.jsonl
            try:
                evalplus_evaluate(dataset=spec.dataset, samples=str(samples), parallel=self.config.evalplus_parallel,
                                  i_just_wanna_run=True)
            except SystemExit as exc:
                raise MissingRequirement(f"EvalPlus stopped ({exc})") from None
            report = json.loads(result_file.read_text())
        n = len(programs[0]) if programs else 1
        ks = [k for k in protocol.pass_at_k if k <= n] or [1]
        plus, base = CODE.pass_rates(report, ids, ks, n)
        detail = {"pass@1_plus": plus["pass@1"], "pass@1_base": base["pass@1"], "pass@k_plus": plus,
                  "pass@k_base": base, "problems": len(ids), "samples_per_problem": n, "limit": self.config.limit,
                  "generation": protocol.record()}
        return plus["pass@1"], detail

    def generate_code(self, adapter, prompts: List[str], protocol: CODE.CodingProtocol) -> List[List[str]]:
        """Completions per prompt: bigcode samples each prompt on its own (its budget is
        max_length_generation minus that prompt's length), greedy runs the batched default."""
        if protocol.name == "greedy":
            return [[c] for c in adapter.generate(prompts, max_new_tokens=protocol.max_new_tokens)]
        budget = protocol.max_length_generation
        out = []
        for prompt in prompts:
            out.append(adapter.generate([prompt], max_new_tokens=budget, num_samples=protocol.samples,
                                        temperature=protocol.temperature, top_p=protocol.top_p,
                                        max_total_tokens=budget, seed=protocol.seed)[0])
        return out

    # ---- safety ----------------------------------------------------------------------------------------
    def judge(self):
        if self._judge is not None:
            return self._judge
        if self._judge_error is not None:
            raise MissingRequirement(self._judge_error)
        try:
            self._judge = WildGuardJudge.load(self.config.safety_judge, batch_size=self.config.judge_batch_size)
        except MissingRequirement as exc:
            self._judge_error = str(exc)
            raise
        return self._judge

    def run_safety(self, adapter, spec: EvalSpec):
        records = read_prompt_file(self.config.safety_data, spec)
        judge = self.judge()  # before generating: a missing judge should fail fast
        if self.config.limit:
            records = records[: self.config.limit]
        prompts = [r["prompt"] for r in records]
        texts, template, has_bos = format_prompts(adapter.tokenizer, prompts, self.config.safety_template)
        kwargs = {"add_special_tokens": False} if has_bos else {}
        responses = adapter.generate(texts, max_new_tokens=self.config.max_new_tokens, **kwargs)
        verdicts = judge(prompts, responses)
        raw, detail = safety_metric(spec, records, verdicts)
        detail["generation"] = {"template": template, "decoding": "greedy",
                                "max_new_tokens": self.config.max_new_tokens}
        return raw, detail


def _evalplus_pass_at_1(report: Dict[str, Any], ids: Sequence[str]):
    """pass@1 of the first sample per problem (plus = base and extra tests, base = base tests)."""
    evals = report.get("eval", {})
    base_ok = plus_ok = 0
    for task_id in ids:
        runs = evals.get(task_id) or []
        if not runs:
            continue
        run = runs[0]
        b = run.get("base_status") == "pass"
        p = b and run.get("plus_status") == "pass"
        base_ok += b
        plus_ok += p
    n = len(ids)
    return (plus_ok / n if n else 0.0), (base_ok / n if n else 0.0)


