"""TRACE's own scoring rules (``benchmark.scoring=reference``, the default): the numbers TRACE's
``metrics.py`` and ``evaluations/eval_*.py`` give on the same predictions, each per example in [0, 1].

Rules, per metric (all from TRACE's scorer; the packages are the ones its ``requirements.txt`` names):

* every metric: an example whose prediction or reference is the empty string ``""`` scores 0 and
  still counts in the mean (TRACE skips it in the sum and divides by all examples). Nothing is
  stripped: ``" A"`` and ``"A\\n"`` are not ``"A"``.
* ``accuracy``: raw string equality.
* ``first_char_accuracy`` (ScienceQA): the first characters of prediction and reference are equal.
* ``rouge_l``: the ``rouge`` package (TRACE pins 1.0.1), ``Rouge(metrics=["rouge-l"])`` F, with the
  *reference* as the package's hypothesis and the prediction as its reference (TRACE's argument
  order). On inputs where the package fails, a recorded fallback: RecursionError (its LCS
  back-tracking recurses once per token: sentences of ~1,000 words) -> the same rule computed
  iteratively here (``rouge_l_rule``, identical value); ValueError (a text with no sentence left
  after splitting on '.', e.g. ``"."``; TRACE's run would stop) -> 0.
* ``edit_similarity`` (Py150): TRACE's literal post-processing, then fuzzywuzzy's ``fuzz.ratio``
  with the backend TRACE's requirements give (fuzzywuzzy without python-Levenshtein: ``difflib``),
  rounded to an integer per example; an example whose post-processed prediction or reference is
  empty scores 0.
* ``sari``: Hugging Face's SARI (``datasets``/``evaluate`` ``sari``), every prediction scored,
  empty ones included (an empty prediction is one empty token after 13a tokenisation).
"""

from __future__ import annotations

import difflib
import re
from typing import Dict, List, Sequence

from cl_merge.errors import UserError

# ---- exact match and ScienceQA -------------------------------------------------------------------


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction != "" and reference != "" and prediction == reference)


def first_char_accuracy(prediction: str, reference: str) -> float:
    return float(prediction != "" and reference != "" and prediction[0] == reference[0])


# ---- ROUGE-L as the `rouge` package (1.0.1) computes it ------------------------------------------


def rouge_sentences(text: str) -> List[str]:
    """The package's sentence split: pieces between '.', empty pieces dropped *before* whitespace is
    collapsed (so a piece of spaces survives as the empty sentence "")."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_token_set(x: List[str], y: List[str]) -> set:
    """Tokens of the one LCS of x and y that the package reconstructs (its tie rule: step back in x
    only when that keeps a strictly longer LCS), without recursion."""
    prev = [0] * (len(y) + 1)
    table = [prev]
    for xi in x:
        row = [0] * (len(y) + 1)
        for j, yj in enumerate(y, start=1):
            row[j] = prev[j - 1] + 1 if xi == yj else max(prev[j], row[j - 1])
        table.append(row)
        prev = row
    out, i, j = set(), len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l_rule(hypothesis: str, reference: str) -> float:
    """Summary-level ROUGE-L F of the package, argument order as its ``get_scores(hyp, ref)``.

    Word counts are distinct words (the package's default ``exclusive=True`` keeps n-grams in sets);
    the union LCS is the set of tokens of every (reference sentence, hypothesis sentence) LCS;
    F = 2PR / (P + R + 1e-8). Raises ValueError where the package does (no sentence)."""
    hyp, ref = rouge_sentences(hypothesis), rouge_sentences(reference)
    if not hyp or not ref:
        raise ValueError("Collections must contain at least 1 sentence.")
    ref_words = [w for s in ref for w in s.split(" ")]
    hyp_words = [w for s in hyp for w in s.split(" ")]
    m, n = len(set(ref_words)), len(set(hyp_words))
    union: set = set()
    for r in ref:
        r_tokens = r.split(" ")
        for h in hyp:
            union |= _lcs_token_set(r_tokens, h.split(" "))
    llcs = len(union)
    r_lcs, p_lcs = llcs / m, llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


class RougeL:
    """ROUGE-L through the ``rouge`` package, with the recorded fallbacks (``fallbacks`` counts them)."""

    def __init__(self):
        try:
            from rouge import Rouge
        except ImportError:
            raise UserError("benchmark.scoring=reference scores MeetingBank with the `rouge` package (TRACE's "
                            "scorer): pip install 'cl_merge[llm]' (rouge==1.0.1), or set "
                            "benchmark.scoring=robust") from None
        self._rouge = Rouge(metrics=["rouge-l"])
        self.fallbacks: Dict[str, int] = {"recursion_error": 0, "value_error": 0}

    def __call__(self, prediction: str, reference: str) -> float:
        if prediction == "" or reference == "":
            return 0.0
        try:  # TRACE: score_rouge(target, prediction) -> get_scores(hyps=target, refs=prediction)
            return float(self._rouge.get_scores(reference, prediction, avg=True)["rouge-l"]["f"])
        except RecursionError:
            self.fallbacks["recursion_error"] += 1
            return rouge_l_rule(reference, prediction)
        except ValueError:
            self.fallbacks["value_error"] += 1
            return 0.0


# ---- Py150: TRACE's post-processing and fuzzywuzzy's ratio ---------------------------------------

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def postprocess_code(code: str) -> str:
    """TRACE's ``eval_Py150.postprocess``: bare literal tokens first, then every ``<KIND_LIT:value>``
    found in the text replaced (all its occurrences, one found literal after the other) by its value."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 ``fuzz.ratio`` on its difflib backend: 100 for equal strings, 0 if either is
    empty, else round(100 * SequenceMatcher(None, a, b).ratio()) (Python's round, half to even)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def edit_similarity(prediction: str, reference: str) -> float:
    a, b = postprocess_code(prediction), postprocess_code(reference)
    if a == "" or b == "":
        return 0.0
    return fuzz_ratio(a, b) / 100.0


# ---- SARI ----------------------------------------------------------------------------------------


def sari(predictions: Sequence[str], references: Sequence, sources: Sequence[str]) -> float:
    """Corpus SARI in [0, 1] as Hugging Face computes it (empty predictions scored, not zeroed)."""
    from .metrics import sari_sentence

    if len(sources) != len(predictions):
        raise ValueError("SARI needs one source per prediction")
    total = 0.0
    for src, pred, ref in zip(sources, predictions, references):
        total += sari_sentence(src, pred, [ref] if isinstance(ref, str) else list(ref), empty_is_zero=False)
    return total / len(predictions) if predictions else 0.0
