"""The ``trace`` benchmark: TRACE's continual instruction-tuning stream (Wang et al. 2023) on a
Hugging Face causal LM (default Llama-3.2-1B-Instruct), under the same protocol, learners and
mergers as the vision suites.

* Settings: ``trace8`` (the official order C-STANCE, FOMC, MeetingBank, Py150, ScienceQA,
  NumGLUE-cm, NumGLUE-ds, 20Minuten) and ``seed7`` (the seed paper's 7 tasks: the same order without
  Py150). ``tasks=A,B,...`` runs any other list of task folders in that order (each needs a metric:
  TRACE's table in ``metrics.TASK_METRICS`` or ``task_metrics=TASK=METRIC,...``).
* Orders: ``1`` is the setting's order; ``seed:N`` is a seeded permutation of it (order studies).
* Data: TRACE's archive layout, ``data_dir/<task>/{train,eval,test}.json`` (see ``data.py``);
  ``eval.json`` is the validation split. ``max_train``/``max_eval``/``max_test`` keep the first N
  records of a split (TRACE's variants use 500/1000/5000 training examples).
* Scores: each task's metric in [0, 1] on generated answers. ``scoring=reference`` (default) applies
  TRACE's own scorer rules (``reference.py``: raw strings, the ``rouge`` package, fuzzywuzzy's
  difflib ratio, Hugging Face's SARI) and decodes as TRACE does (``clean_up_tokenization_spaces=
  False``); ``scoring=robust`` the lenient rules of ``metrics.py`` (each difference listed there).
  The per-task metric, TRACE's own scale for it, the scoring mode, the scorer packages' versions,
  the ROUGE-L fallbacks used and the decoding settings are recorded under ``benchmark_detail``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

from cl_merge.benchmark import Benchmark, fixed_or_seeded_order, permuted
from cl_merge.errors import UserError
from cl_merge.registry import register_benchmark
from cl_merge.task import Stream, Task, take_prefix

from ..scorer_versions import scorer_versions
from . import metrics as M
from .data import load_task, task_dir

OFFICIAL_ORDER = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds",
                  "20Minuten")
SETTINGS = {
    "trace8": OFFICIAL_ORDER,
    "seed7": tuple(t for t in OFFICIAL_ORDER if t != "Py150"),
}
AUTO_BUDGET_CAP = 512  # TRACE's max_ans_len
AUTO_BUDGET_MARGIN = 16


class TraceEvaluator:
    """``evaluator(adapter, task, split)``: generate an answer per prompt, score with the task's metric.

    The generation budget is ``max_new_tokens`` when set, else (``auto``) the longest tokenised
    training answer + 16 tokens, capped at TRACE's 512: enough for any answer of the task's own
    length, without letting an untrained model ramble for 512 tokens on a one-word label task.
    SARI's source sentence is the full prompt, as in TRACE's ``eval_20Minuten`` (it passes the
    input sequences).
    """

    def __init__(self, metric: str, max_new_tokens: Optional[int], scoring: str = "reference"):
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.scorer = M.Scorer(metric, scoring)
        self._budget: Dict[str, int] = {}

    def budget(self, adapter, task: Task) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if task.name not in self._budget:
            tok = adapter.tokenizer
            longest = max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in task.train)
            self._budget[task.name] = min(AUTO_BUDGET_CAP, longest + AUTO_BUDGET_MARGIN)
        return self._budget[task.name]

    def __call__(self, adapter, task: Task, split: str) -> float:
        records = list(task.split(split))
        prompts = [r["prompt"] for r in records]
        predictions = adapter.generate(prompts, max_new_tokens=self.budget(adapter, task))
        return self.scorer(predictions, [r["answer"] for r in records], prompts)


@dataclasses.dataclass
class TraceStream(Stream):
    detail: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def results_detail(self) -> Dict[str, Any]:
        fallbacks = {t.name: t.evaluator.scorer.fallbacks for t in self.tasks
                     if isinstance(t.evaluator, TraceEvaluator) and t.evaluator.scorer.fallbacks}
        # counts over every evaluation of the run (each matrix cell scores the task's split once)
        return {**self.detail, "rouge_fallbacks": fallbacks}


@register_benchmark
@dataclasses.dataclass
class TraceBenchmark(Benchmark):
    name = "trace"
    description = ("TRACE continual instruction tuning (8 tasks, or the seed paper's 7 without Py150) "
                   "on a HF causal LM (default Llama-3.2-1B-Instruct); data_dir=<TRACE archive>")
    # lr 2e-5 and batch 8 are the seed setting; 625 steps = one epoch of the 5000-example variant
    train_defaults = {"steps": 625, "batch_size": 8, "lr": 2e-5}
    default_order = 1

    model: str = "meta-llama/Llama-3.2-1B-Instruct"  # hub id or local save_pretrained folder
    revision: Optional[str] = None
    data_dir: Optional[str] = None  # DIR/<task>/{train,eval,test}.json
    setting: Literal["trace8", "seed7"] = "trace8"
    tasks: Optional[Tuple[str, ...]] = None  # explicit task folders in order (overrides setting)
    task_metrics: Tuple[str, ...] = ()  # TASK=METRIC,... for tasks outside TRACE's table
    max_train: Optional[int] = None  # keep the first N records of each split (None: all)
    max_eval: Optional[int] = None
    max_test: Optional[int] = None
    max_length: int = 2048  # tokens of prompt + answer (prompt cut from the left)
    max_new_tokens: Optional[int] = None  # None: per task, longest train answer + 16, at most 512
    temperature: float = 0.0  # 0: greedy (default); TRACE samples at 0.1 (then not reproducible bit-for-bit)
    top_p: float = 1.0  # sampling only
    generation_seed: int = 0  # sampling only: seed of every evaluation's draws
    generation_batch_size: Optional[int] = None  # None: run.eval_batch_size
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    include_embeddings: bool = False  # also merge/train token embeddings and the LM head
    scoring: Literal["reference", "robust"] = "reference"  # TRACE's own scorer rules, or the lenient ones

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        for key in ("max_train", "max_eval", "max_test", "max_new_tokens", "generation_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or none; got {value}")
        self._metric_overrides = {}
        for item in self.task_metrics:
            task, sep, metric = item.partition("=")
            if not sep or metric not in M.METRICS:
                raise ValueError(f"task_metrics entries are TASK=METRIC with METRIC one of "
                                 f"{', '.join(M.METRICS)}; got {item!r}")
            self._metric_overrides[task] = metric

    # ---- tasks and orders ---------------------------------------------------------------------
    def setting_names(self) -> List[str]:
        return list(self.tasks) if self.tasks else list(SETTINGS[self.setting])

    def task_names(self, order: Any = 1) -> List[str]:
        """The stream's task names in order (``num_tasks`` prefix), without loading data."""
        return take_prefix(self.ordered_names(order), self.num_tasks)

    def metric_of(self, task: str) -> str:
        metric = self._metric_overrides.get(task, M.TASK_METRICS.get(task))
        if metric is None:
            raise UserError(f"task '{task}' has no TRACE metric; add benchmark.task_metrics={task}=METRIC "
                            f"(METRIC: {', '.join(M.METRICS)})")
        return metric

    def orders(self) -> List[Any]:
        return [1]

    def resolve_order(self, order: Any) -> Any:
        return fixed_or_seeded_order(order, "trace", "the setting's order")

    def ordered_names(self, order: Any) -> List[str]:
        return permuted(self.setting_names(), self.resolve_order(order))

    # ---- model and stream ---------------------------------------------------------------------
    def build_model(self, cache_dir: Path, device: str, eval_batch_size: int):
        from cl_merge.models.hf_causal_lm import CausalLMAdapter, load_causal_lm

        for name in self.setting_names():  # a missing data folder fails before a model download
            task_dir(self.data_dir, name)
        model, tokenizer = load_causal_lm(self.model, device=device, revision=self.revision)
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if str(device).startswith("cuda") else "fp32"
        return CausalLMAdapter(
            model, tokenizer, model_id=f"hf:{self.model}" + (f"@{self.revision}" if self.revision else ""),
            device=device, max_length=self.max_length, max_new_tokens=self.max_new_tokens or AUTO_BUDGET_CAP,
            eval_batch_size=self.generation_batch_size or eval_batch_size,
            include_embeddings=self.include_embeddings, temperature=self.temperature, top_p=self.top_p,
            generation_seed=self.generation_seed, precision=precision,
            gradient_checkpointing=self.gradient_checkpointing,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces())

    def clean_up_tokenization_spaces(self) -> Optional[bool]:
        """TRACE decodes with ``clean_up_tokenization_spaces=False``; robust keeps the tokenizer's default."""
        return False if self.scoring == "reference" else None

    def build_task(self, name: str) -> Task:
        metric = self.metric_of(name)
        caps = {"train": self.max_train, "val": self.max_eval, "test": self.max_test}
        splits, fingerprint = load_task(self.data_dir, name, caps)
        return Task(name=name, classnames=(), templates=(), fingerprint=fingerprint,
                    evaluator=TraceEvaluator(metric, self.max_new_tokens, self.scoring),
                    metadata={"metric": metric, "trace_scale": M.SCALES[metric]}, **splits)

    def build_stream(self, order: Any, seed: int) -> Stream:
        tasks = [self.build_task(n) for n in self.task_names(order)]
        detail = {
            "setting": None if self.tasks else self.setting,
            "task_metrics": {t.name: t.metadata["metric"] for t in tasks},
            # TRACE reports these metrics on 0-1 or 0-100; the matrix holds them all on [0, 1]
            "trace_scale": {t.name: t.metadata["trace_scale"] for t in tasks},
            "score_range": [0, 1],
            "scoring": self.scoring,
            "scorer_versions": scorer_versions(),
            "scorer_backends": ({"rouge_l": "rouge (summary-level, TRACE's argument order)",
                                 "edit_similarity": "difflib SequenceMatcher (fuzzywuzzy without python-Levenshtein)",
                                 "sari": "cl_merge, Hugging Face's SARI with sacrebleu 13a tokenisation"}
                                if self.scoring == "reference" else
                                {"rouge_l": "rouge-score", "edit_similarity": "rapidfuzz",
                                 "sari": "cl_merge, Hugging Face's SARI with sacrebleu 13a tokenisation"}),
            "split_sizes": {t.name: {s: len(t.split(s)) for s in ("train", "val", "test")} for t in tasks},
            "decoding": {
                "strategy": "sample" if self.temperature > 0 else "greedy",
                "temperature": self.temperature,
                "top_p": self.top_p if self.temperature > 0 else None,
                "generation_seed": self.generation_seed if self.temperature > 0 else None,
                "max_new_tokens": self.max_new_tokens if self.max_new_tokens is not None
                else f"auto (longest train answer + {AUTO_BUDGET_MARGIN}, at most {AUTO_BUDGET_CAP})",
                "padding_side": "left",
                "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces(),
                "skip_special_tokens": True,
                "reproducible": self.temperature == 0,
            },
            "mergeable": "all transformer weights" + (" incl. embeddings and LM head" if self.include_embeddings
                                                      else " except token embeddings and LM head"),
        }
        return TraceStream(benchmark=self.name, tasks=tasks, order=order, seed=seed, detail=detail)
