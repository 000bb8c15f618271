"""``mergebench``: continual merging of MergeBench's published domain experts (He et al. 2025).

Five experts, full fine-tunes of one base (``MergeBench/{base}_{domain}``), are folded in one at a time
by the merger under the independent protocol with the ``checkpoint`` learner (pure continual merging).
The stream's tasks are the domains; the seed paper's order (order 1) is instruction, math,
multilingual, coding, safety; ``seed:N`` draws a permutation. Each cell of the accuracy matrix is a
domain score (the mean of its tasks' scores, see ``evaluation.py`` and ``tasks.json``); the overall
MergeBench score of a row is the mean of its domain scores, i.e. the run's ACC for the final row.

Memory: the run uses the on-disk parameter store (``cl_merge.store.DiskStorage``) under the one protocol
loop: θ0 and the experts are read one tensor at a time from their safetensors, the deployed model and
the merger state are written one tensor at a time into the run's checkpoint folder, and the only model
in memory is the evaluated one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

from cl_merge.benchmark import Benchmark, fixed_or_seeded_order, permuted
from cl_merge.registry import register_benchmark
from cl_merge.task import Stream, Task, take_prefix

from . import model_sources as C
from ..scorer_versions import scorer_versions
from .coding import CodingProtocol
from .evaluation import EvalConfig, Evaluator, load_specs, summarize

SEED_ORDER = ("instruction", "math", "multilingual", "coding", "safety")


@dataclasses.dataclass
class MergeBenchStream(Stream):
    """The stream plus an evaluation log: every domain evaluation's per-task results, by phase."""

    log: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    phase: Tuple[str, str] = ("", "")
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def set_phase(self, phase: str, task: str) -> None:
        self.phase = (phase, task)

    def order_record(self) -> Dict[str, Any]:
        return {"id": self.order, "domains": self.names}

    def results_detail(self) -> Dict[str, Any]:
        return {"mergebench": {"evaluations": self.log, **self.settings}}


@register_benchmark
@dataclasses.dataclass
class MergeBenchBenchmark(Benchmark):
    name = "mergebench"
    description = ("MergeBench: continual merging of 5 published domain experts (instruction, math, multilingual, "
                   "coding, safety) of Llama-3.2-3B / 3.1-8B / gemma-2 (-Instruct/-it); checkpoint learner, streamed")
    parameter_store = "disk"
    has_validation = False  # lm-eval tasks carry no validation split (no final validation row)
    default_order = 1

    base: str = "Llama-3.2-3B"  # a MergeBench base name (its experts are MergeBench/{base}_{domain})
    base_path: Optional[str] = None  # θ0 as a local folder or hub id (default: the base's hub id)
    experts: Tuple[str, ...] = ()  # per-domain expert overrides: domain=PATH_OR_HUB_ID,...
    expert_template: str = C.EXPERT_TEMPLATE
    eval_tasks: Optional[str] = None  # a tasks.json of the same layout (default: the shipped MergeBench list)
    include_path: Optional[str] = None  # extra lm-eval task folder (custom YAML tasks)
    lm_eval_builtin_tasks: bool = True  # false: index only include_path (custom task lists; faster start)
    limit: Optional[int] = None  # per evaluation task (smoke runs only; recorded)
    apply_chat_template: bool = False  # lm-eval chat formatting (instruct bases)
    max_length: int = 4096  # context budget of generation (prompt + new tokens)
    max_new_tokens: int = 512  # safety generations and greedy coding
    # coding: MergeBench's bigcode protocol (n samples at T/top-p, max_length_generation tokens incl. the
    # prompt, unbiased pass@1) or greedy (one completion, max_new_tokens new tokens)
    coding_protocol: Literal["bigcode", "greedy"] = "bigcode"
    coding_samples: int = 10
    coding_temperature: float = 0.2
    coding_top_p: float = 0.95
    coding_max_length: int = 512
    coding_seed: int = 0
    safety_template: Literal["llama3", "chat", "raw"] = "llama3"  # MergeBench's Llama-3 format, the tokenizer's own, raw
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    safety_data: Optional[str] = None  # folder with wildguardtest/harmbench/do_anything_now/xstest .jsonl
    safety_judge: str = "allenai/wildguard"  # the judge model (gated on the hub) or a local folder
    evalplus_data: Optional[str] = None  # folder with HumanEvalPlus.jsonl / MbppPlus.jsonl (else EvalPlus' cache)
    store_dtype: Literal["float32", "bfloat16"] = "float32"  # deployed model / merger state files
    merge_device: Optional[str] = None  # where a tensor's merge math runs (default: the run's device)
    expert_eval_full: bool = True  # evaluate an expert with all its tensors (embeddings/LM head too)
    save_merged: Optional[str] = None  # copy the final deployed tensors (merged parameters) to this file

    def __post_init__(self):
        if self.num_tasks is not None and not 2 <= self.num_tasks <= len(SEED_ORDER):
            raise ValueError(f"num_tasks must be between 2 and {len(SEED_ORDER)}; got {self.num_tasks}")
        if self.base not in C.BASES and not self.base_path:
            raise ValueError(f"unknown base {self.base!r}; known: {', '.join(C.BASES)} (or give base_path)")
        self._experts = C.parse_pairs(self.experts, SEED_ORDER, "experts")
        self._specs = load_specs(self.eval_tasks)
        unknown = sorted(set(self._specs) - set(SEED_ORDER))
        missing = [d for d in SEED_ORDER if d not in self._specs]
        if unknown or missing:
            raise ValueError(f"evaluation task list must cover exactly the domains {', '.join(SEED_ORDER)} "
                             f"(missing: {missing or 'none'}, unknown: {unknown or 'none'})")
        self._coding = CodingProtocol(name=self.coding_protocol, samples=self.coding_samples,
                                      temperature=self.coding_temperature, top_p=self.coding_top_p,
                                      max_length_generation=self.coding_max_length,
                                      max_new_tokens=self.max_new_tokens, seed=self.coding_seed)
        self._base_dir: Optional[Path] = None
        self._evaluator: Optional[Evaluator] = None
        self._device = "cpu"

    # ---- orders -------------------------------------------------------------------------------------
    def orders(self) -> List[Any]:
        return [1]

    def resolve_order(self, order: Any) -> Any:
        return fixed_or_seeded_order(order, "mergebench", "instruction, math, multilingual, coding, safety")

    @staticmethod
    def order_domains(order: Any) -> List[str]:
        return permuted(SEED_ORDER, fixed_or_seeded_order(order, "mergebench", "the seed's order"))

    # ---- checkpoints --------------------------------------------------------------------------------
    def base_ref(self) -> str:
        return self.base_path or C.BASES[self.base]

    def base_dir(self) -> Path:
        if self._base_dir is None:
            self._base_dir = C.resolve(self.base_ref(), "base model")
        return self._base_dir

    def expert_ref(self, domain: str) -> str:
        return self._experts.get(domain) or self.expert_template.format(base=self.base, domain=domain)

    # ---- model ----------------------------------------------------------------------------------------
    def build_model(self, cache_dir: Path, device: str, eval_batch_size: int):
        from cl_merge.models.hf_causal_lm import CausalLMAdapter, load_causal_lm

        self._device = device
        path = self.base_dir()
        model, tokenizer = load_causal_lm(str(path), device=device, local_files_only=True)
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if str(device).startswith("cuda") else "fp32"
        return CausalLMAdapter(model, tokenizer, model_id=f"hf:{self.base_ref()}", device=device,
                               max_length=self.max_length, max_new_tokens=self.max_new_tokens,
                               eval_batch_size=eval_batch_size, precision=precision)

    def evaluator(self, eval_batch_size: int = 8) -> Evaluator:
        if self._evaluator is None:
            config = EvalConfig(batch_size=eval_batch_size, limit=self.limit, include_path=self.include_path,
                                builtin_tasks=self.lm_eval_builtin_tasks,
                                apply_chat_template=self.apply_chat_template, max_new_tokens=self.max_new_tokens,
                                safety_data=self.safety_data, safety_judge=self.safety_judge,
                                evalplus_data=self.evalplus_data, coding=self._coding,
                                safety_template=self.safety_template)
            self._evaluator = Evaluator(config, self._specs)
        return self._evaluator

    def protocol_record(self) -> Dict[str, Any]:
        """Every generation/scoring setting that decides a MergeBench number (results: evaluation_protocol)."""
        return {
            "coding": self._coding.record(),
            "safety": {"template": self.safety_template, "decoding": "greedy", "max_new_tokens": self.max_new_tokens,
                       "judge": self.safety_judge},
            "lm_eval": {"apply_chat_template": self.apply_chat_template, "limit": self.limit,
                        "bootstrap_iters": 0},
            "metric_keys": {s.name: {"metric": s.metric or ("pass@1" if s.kind == "evalplus" else None),
                                     "aggregate": s.aggregate if s.kind == "safety" else None,
                                     "source": s.source}
                            for specs in self._specs.values() for s in specs},
        }

    # ---- stream ---------------------------------------------------------------------------------------
    def build_stream(self, order: Any, seed: int) -> MergeBenchStream:
        domains = take_prefix(self.order_domains(order), self.num_tasks)
        stream = MergeBenchStream(benchmark=self.name, tasks=[], order=order, seed=seed)
        stream.settings = {"base": self.base_ref(), "limit": self.limit,
                           "eval_tasks": {d: [s.name for s in self._specs[d]] for d in domains},
                           "experts": {d: self.expert_ref(d) for d in domains},
                           "evaluation_protocol": self.protocol_record(),
                           "scorer_versions": scorer_versions(),
                           "conventions": {"domain_score": "mean of the domain's task scores (tasks that ran)",
                                           "overall": "mean of the domain scores (= acc for the final row)",
                                           "lower_is_better": "rates inverted to 1 - rate; raw kept, inverted=true"}}

        def evaluate(adapter, task: Task, split: str) -> Optional[float]:
            evaluator = self.evaluator(getattr(adapter, "eval_batch_size", 8))
            results = evaluator.evaluate_domain(adapter, task.name)
            summary = summarize({task.name: results})
            stream.log.append({"phase": stream.phase[0], "domain": task.name,
                               "score": summary["domains"][task.name], "complete": summary["complete"],
                               "tasks": summary["tasks"][task.name]})
            return summary["domains"][task.name]

        for d in domains:
            fp = hashlib.sha256(f"{self.base_ref()}|{d}|{[s.name for s in self._specs[d]]}|{self.limit}".encode())
            stream.tasks.append(Task(name=d, classnames=(), templates=(), train=[], val=[], test=[],
                                     fingerprint=fp.hexdigest(), evaluator=evaluate,
                                     metadata={"expert_checkpoint": self.expert_ref(d), "domain": d}))
        return stream

    # ---- the parameter store -----------------------------------------------------------------------------
    def parameter_storage(self, *, adapter, checkpointer, device):
        from cl_merge.store import DiskStorage

        return DiskStorage(self.base_dir(), checkpointer.directory / "stream", names=list(adapter.trainable_parameters()),
                           model_names=[n for n, _ in adapter.model.named_parameters()],
                           store_dtype=self.store_dtype, device=self.merge_device or self._device,
                           expert_eval_full=self.expert_eval_full)

    def finish_run(self, stream, record) -> None:
        rows = record["acc_matrix"]
        stream.settings["overall_per_row"] = [_mean([v for v in row if v is not None]) for row in rows]
        stream.settings["streaming"] = record.get("store_steps")
        stream.settings["mergeable_bytes"] = record.get("mergeable_bytes")
        deployed = getattr(record.get("deployed"), "path", None)
        if self.save_merged and deployed is not None:
            import shutil

            Path(self.save_merged).expanduser().parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(deployed, Path(self.save_merged).expanduser())


def _mean(values):
    return sum(values) / len(values) if values else None
