"""MergeBench's coding domain (HumanEval+, MBPP+): generation protocol, post-processing, pass@k.

``bigcode`` (default) is the protocol of MergeBench's ``scripts/evaluate.sh`` and its released
``code_eval.json`` (bigcode-evaluation-harness): n = 10 samples per problem at temperature 0.2,
top-p 0.95, top-k off, ``max_length_generation`` 512 tokens *including the prompt*, seed 0; the
HumanEval+ prompt stripped (bigcode's ``humanevalplus`` task), the completion cut at the task's stop
sequences and appended to the prompt; scored by EvalPlus' test runner (base + extra tests) with the
unbiased pass@k estimator of Chen et al. (2021). ``greedy`` is one greedy completion per problem with
``max_new_tokens`` new tokens, extracted with EvalPlus' ``sanitize`` (pass@1 = share solved).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Sequence

# bigcode-evaluation-harness stop sequences (tasks/humaneval.py and tasks/mbpp.py)
STOP_SEQUENCES = {
    "humaneval": ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"),
    "mbpp": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"),
}


@dataclasses.dataclass(frozen=True)
class CodingProtocol:
    name: str = "bigcode"  # bigcode | greedy
    samples: int = 10
    temperature: float = 0.2
    top_p: float = 0.95
    max_length_generation: int = 512  # prompt + completion tokens (bigcode)
    max_new_tokens: int = 512  # greedy only
    seed: int = 0
    pass_at_k: tuple = (1, 10)

    def __post_init__(self):
        if self.name not in ("bigcode", "greedy"):
            raise ValueError(f"coding protocol must be bigcode or greedy; got {self.name!r}")
        if self.name == "bigcode" and (self.samples < 1 or self.temperature <= 0):
            raise ValueError("the bigcode coding protocol needs samples >= 1 and a temperature > 0")

    def record(self) -> Dict[str, Any]:
        if self.name == "greedy":
            return {"protocol": "greedy", "samples": 1, "temperature": 0.0, "max_new_tokens": self.max_new_tokens,
                    "extraction": "evalplus.sanitize", "metric": "pass@1 (share of problems solved)"}
        return {"protocol": "bigcode", "samples": self.samples, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": 0, "max_length_generation": self.max_length_generation,
                "max_length_includes_prompt": True, "seed": self.seed,
                "humaneval_prompt": "stripped", "extraction": "prompt + completion cut at bigcode's stop sequences",
                "metric": "unbiased pass@k (Chen et al. 2021), k = " + ", ".join(map(str, self.pass_at_k)),
                "source": "MergeBench scripts/evaluate.sh and its released code_eval.json config"}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct of n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"{c} correct of {n} samples")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def stop_at(completion: str, stops: Sequence[str]) -> str:
    """The completion up to the first stop sequence (bigcode's ``_stop_at_stop_token``)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i != -1), default=len(completion))
    return completion[:cut]


def prompt_for(dataset: str, prompt: str, protocol: CodingProtocol) -> str:
    return prompt.strip() if protocol.name == "bigcode" and dataset == "humaneval" else prompt


def solutions(dataset: str, prompts: List[str], completions: List[List[str]], entry_points: List[str],
              protocol: CodingProtocol) -> List[List[str]]:
    """Programs to execute: one list per problem, one program per sample."""
    if protocol.name == "bigcode":
        stops = STOP_SEQUENCES[dataset]
        return [[p + stop_at(c, stops) for c in cs] for p, cs in zip(prompts, completions)]
    from evalplus.sanitize import sanitize

    return [[sanitize(p + c, e) for c in cs] for p, cs, e in zip(prompts, completions, entry_points)]


def pass_rates(report: Dict[str, Any], ids: Sequence[str], ks: Sequence[int], samples: int):
    """(pass@k with base + extra tests, pass@k with base tests) per k, from EvalPlus' eval_results.json;
    a problem missing from the report counts as 0 correct of ``samples``."""
    evals = report.get("eval", {})
    plus: Dict[str, float] = {}
    base: Dict[str, float] = {}
    counts = []
    for task_id in ids:
        runs = evals.get(task_id) or []
        if not runs:
            counts.append((samples, 0, 0))
            continue
        b = sum(r.get("base_status") == "pass" for r in runs)
        p = sum(r.get("base_status") == "pass" and r.get("plus_status") == "pass" for r in runs)
        counts.append((len(runs), b, p))
    for k in ks:
        usable = [(n, b, p) for n, b, p in counts if n >= k]
        if len(usable) != len(counts):
            continue  # fewer samples than k for some problem: no pass@k
        plus[f"pass@{k}"] = sum(pass_at_k(n, p, k) for n, _, p in usable) / len(ids) if ids else 0.0
        base[f"pass@{k}"] = sum(pass_at_k(n, b, k) for n, b, _ in usable) / len(ids) if ids else 0.0
    return plus, base
