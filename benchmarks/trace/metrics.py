"""TRACE's task metrics, every one scored in [0, 1] (TRACE reports some on 0-100; see ``SCALES``).

Which task uses which metric (TRACE's evaluation scripts, ``evaluations/eval_*.py``):

============  ===========================  ===========================================
task          metric (name in results)      TRACE's own scale
============  ===========================  ===========================================
C-STANCE      ``accuracy`` exact match      0-1
FOMC          ``accuracy`` exact match      0-1
MeetingBank   ``rouge_l`` ROUGE-L F1        0-1
Py150         ``edit_similarity``           0-100 (fuzzywuzzy ``fuzz.ratio``)
ScienceQA     ``first_char_accuracy``       0-1
NumGLUE-cm    ``accuracy`` exact match      0-1
NumGLUE-ds    ``accuracy`` exact match      0-1
20Minuten     ``sari``                      0-100 (Hugging Face ``evaluate`` SARI)
============  ===========================  ===========================================

Two scoring modes (``benchmark.scoring``):

* ``reference`` (default): TRACE's own rules, the numbers its scorer gives (``reference.py``).
* ``robust``: the lenient rules in this module. Each differs from ``reference`` as follows:

  - every metric: predictions and references are ``str.strip()``-ed first, and a prediction of
    nothing but whitespace scores 0 (reference: no strip; only ``""`` scores 0);
  - ``accuracy``: equality after stripping (reference: raw equality; ``" A"``/``"A\\n"`` miss);
  - ``first_char_accuracy``: the first non-space character after an ``Answer:`` tag if the text has
    one, else the first non-space character (reference: the first character, whatever it is);
  - ``rouge_l``: Google's ``rouge-score`` ROUGE-L F1 over lower-cased alphanumeric tokens, the LCS of
    the whole text (reference: the ``rouge`` package, case-sensitive, split on whitespace and
    '.', summary-level union LCS over distinct words);
  - ``edit_similarity``: ``rapidfuzz`` Levenshtein indel ratio without rounding, two empty
    normalised texts score 1 (reference: fuzzywuzzy's difflib ratio rounded to an integer per
    example, an empty normalised text scores 0);
  - ``sari``: an empty prediction scores 0 (reference: scored as Hugging Face does; 13-49 points on
    the tests' cases, as deleting every source n-gram earns deletion credit).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Dict, List, Sequence

# ---- exact match ---------------------------------------------------------------------------------


def exact_match(prediction: str, reference: str) -> float:
    """1 if prediction and reference are equal after stripping surrounding whitespace."""
    p, r = prediction.strip(), reference.strip()
    return float(bool(p) and p == r)


_ANSWER_TAG = "Answer:"


def answer_choice(text: str) -> str:
    """The option letter of a ScienceQA output (robust mode): the first non-space character after
    ``Answer:`` when the text has that tag, otherwise the first non-space character. TRACE itself
    takes the first character (``reference.first_char_accuracy``)."""
    at = text.find(_ANSWER_TAG)
    rest = text[at + len(_ANSWER_TAG):] if at >= 0 else text
    rest = rest.strip()
    return rest[:1]


def first_char_accuracy(prediction: str, reference: str) -> float:
    """ScienceQA: 1 if the predicted option letter equals the reference's (see ``answer_choice``)."""
    p, r = answer_choice(prediction), answer_choice(reference)
    return float(bool(p) and p == r)


# ---- ROUGE-L -------------------------------------------------------------------------------------

_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """Robust mode: ROUGE-L F1 (longest common subsequence of tokens) from Google's ``rouge-score``;
    tokens are lower-cased alphanumeric runs, no stemming."""
    global _ROUGE
    if not prediction.strip():
        return 0.0
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


# ---- Py150 edit similarity -----------------------------------------------------------------------

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def normalise_code(code: str) -> str:
    """TRACE's Py150 post-processing: ``<NUM_LIT>`` -> ``0``, ``<STR_LIT>`` and ``<CHAR_LIT>`` ->
    nothing, ``<KIND_LIT:value>`` -> ``value``."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def edit_similarity(prediction: str, reference: str) -> float:
    """Levenshtein (indel) ratio of the normalised code lines: 2·LCS/(|a|+|b|), in [0, 1]. This is
    ``rapidfuzz.fuzz.ratio / 100``, i.e. fuzzywuzzy's ``fuzz.ratio`` (TRACE) without its rounding."""
    if not prediction.strip():
        return 0.0
    from rapidfuzz import fuzz

    a, b = normalise_code(prediction.strip()), normalise_code(reference.strip())
    if not a and not b:
        return 1.0
    return float(fuzz.ratio(a, b)) / 100.0


# ---- SARI ----------------------------------------------------------------------------------------
# Xu et al. 2016, as in tensor2tensor / Hugging Face `evaluate` (which TRACE calls): for n = 1..4,
# keep F1, deletion precision and addition F1 over n-gram multisets, with the source and candidate
# counts replicated once per reference; 0/0 counts as 1; the keep recall divides by the total count
# (the t2t fix); SARI = mean over n of (keep + delete + add) / 3. Sentences are lower-cased and
# tokenised with sacrebleu's "13a" rules (implemented below, no sacrebleu dependency).

_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # most punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenisation (sacrebleu's default ``13a``)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens: List[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _sari_n(source: Counter, candidate: Counter, refs: List[Counter], num_refs: int):
    ref_all: Counter = Counter()
    for r in refs:
        ref_all.update(r)
    src = Counter({g: c * num_refs for g, c in source.items()})
    cand = Counter({g: c * num_refs for g, c in candidate.items()})

    kept = src & cand  # n-grams the system kept
    kept_good = kept & ref_all  # ... which the references keep too
    keep_possible = src & ref_all  # what the references keep
    keep_p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(keep_possible.values()) if keep_possible else 1.0
    keep = _f1(keep_p, keep_r)

    deleted = src - cand
    deleted_good = deleted - ref_all
    delete_p = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0

    added = set(candidate) - set(source)
    added_good = added & set(ref_all)
    add_possible = set(ref_all) - set(source)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(add_possible) if add_possible else 1.0
    add = _f1(add_p, add_r)
    return keep, delete_p, add


def sari_sentence(source: str, prediction: str, references: Sequence[str], normalise: bool = True,
                  empty_is_zero: bool = True) -> float:
    """SARI of one prediction in [0, 1] (Hugging Face reports 100 x this). A prediction of nothing but
    whitespace scores 0 with ``empty_is_zero`` (robust); without it, it is scored like any other
    (Hugging Face: one empty token)."""
    if empty_is_zero and not prediction.strip():
        return 0.0
    prep = (lambda s: tokenize_13a(s.lower())) if normalise else (lambda s: s)
    s_tok = prep(source).split(" ")
    c_tok = prep(prediction).split(" ")
    r_toks = [prep(r).split(" ") for r in references]
    keep = delete = add = 0.0
    for n in range(1, 5):
        k, d, a = _sari_n(_ngrams(s_tok, n), _ngrams(c_tok, n), [_ngrams(r, n) for r in r_toks], len(r_toks))
        keep, delete, add = keep + k, delete + d, add + a
    return (keep / 4 + delete / 4 + add / 4) / 3


# ---- corpus level --------------------------------------------------------------------------------


def _pairwise(fn: Callable[[str, str], float]):
    def corpus(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
        _check(predictions, references)
        return sum(fn(p, r) for p, r in zip(predictions, references)) / len(predictions) if predictions else 0.0

    return corpus


def sari(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
    """Corpus SARI in [0, 1]: mean of sentence SARI, one reference per example (TRACE's layout).
    ``references`` items may also be lists of several references."""
    _check(predictions, references)
    if len(sources) != len(predictions):
        raise ValueError("SARI needs one source per prediction")
    total = 0.0
    for src, pred, ref in zip(sources, predictions, references):
        total += sari_sentence(src, pred, [ref] if isinstance(ref, str) else list(ref))
    return total / len(predictions) if predictions else 0.0


def _check(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


METRICS: Dict[str, Callable[..., float]] = {
    "accuracy": _pairwise(exact_match),
    "first_char_accuracy": _pairwise(first_char_accuracy),
    "rouge_l": _pairwise(rouge_l),
    "edit_similarity": _pairwise(edit_similarity),
    "sari": sari,
}

# task -> metric, and the scale TRACE reports that metric on (the matrix always holds [0, 1])
TASK_METRICS: Dict[str, str] = {
    "C-STANCE": "accuracy",
    "FOMC": "accuracy",
    "MeetingBank": "rouge_l",
    "Py150": "edit_similarity",
    "ScienceQA": "first_char_accuracy",
    "NumGLUE-cm": "accuracy",
    "NumGLUE-ds": "accuracy",
    "20Minuten": "sari",
}
SCALES: Dict[str, int] = {"accuracy": 1, "first_char_accuracy": 1, "rouge_l": 1, "edit_similarity": 100,
                          "sari": 100}


SCORING_MODES = ("reference", "robust")


class Scorer:
    """One task's metric in one scoring mode: ``scorer(predictions, references, sources)`` -> [0, 1].
    ``fallbacks`` counts the reference ROUGE-L inputs the ``rouge`` package could not score."""

    def __init__(self, metric: str, scoring: str = "reference"):
        if metric not in METRICS:
            raise ValueError(f"unknown TRACE metric {metric!r}; known: {', '.join(METRICS)}")
        if scoring not in SCORING_MODES:
            raise ValueError(f"unknown scoring mode {scoring!r}; known: {', '.join(SCORING_MODES)}")
        self.metric, self.scoring = metric, scoring
        self._rouge = None
        if scoring == "robust":
            self._fn = METRICS[metric]
        else:
            from . import reference as R

            if metric == "sari":
                self._fn = R.sari
            else:
                if metric == "rouge_l":
                    self._rouge = R.RougeL()
                pairwise = {"accuracy": R.exact_match, "first_char_accuracy": R.first_char_accuracy,
                            "rouge_l": self._rouge, "edit_similarity": R.edit_similarity}[metric]
                self._fn = _pairwise(pairwise)

    @property
    def fallbacks(self) -> Dict[str, int]:
        return dict(self._rouge.fallbacks) if self._rouge is not None else {}

    def __call__(self, predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
        return self._fn(predictions, references, sources)


def score(metric: str, predictions: Sequence[str], references: Sequence[str], sources: Sequence[str],
          scoring: str = "reference") -> float:
    return Scorer(metric, scoring)(predictions, references, sources)
