"""benchmark.scoring=reference against the packages and rules TRACE's scorer uses, on >= 50 varied cases
per metric (tests/_trace_cases.py): exact agreement (ROUGE-L and SARI to 1e-9, edit similarity to the
integer). The oracles here are the reference packages themselves (`rouge` 1.0.1, fuzzywuzzy on
difflib, sacrebleu's 13a tokenizer) plus TRACE's per-example rules written out independently."""

import difflib
import re
import sys
from collections import Counter

import pytest

import _trace_cases as C
from cl_merge.benchmarks.trace import metrics as M
from cl_merge.benchmarks.trace import reference as R


def per_example(metric, scoring, pairs):
    scorer = M.Scorer(metric, scoring)
    return [scorer([p], [r], [s[0]] if s else [""]) for p, r, *s in pairs], scorer


def changed(metric, pairs):
    """How many cases score differently under robust and reference."""
    ref, _ = per_example(metric, "reference", pairs)
    rob, _ = per_example(metric, "robust", pairs)
    return sum(abs(a - b) > 1e-12 for a, b in zip(ref, rob))


# ---- exact match and ScienceQA: TRACE's caculate_accuracy / eval_ScienceQA rules -------------------

def trace_accuracy(p, t):
    return 0.0 if p == "" or t == "" else float(p == t)


def test_exact_match_is_raw_string_equality():
    cases = C.label_cases()
    assert len(cases) >= 50
    got, _ = per_example("accuracy", "reference", cases)
    assert got == [trace_accuracy(p, t) for p, t in cases]
    corpus = M.Scorer("accuracy")([p for p, _ in cases], [t for _, t in cases])
    assert corpus == pytest.approx(sum(trace_accuracy(p, t) for p, t in cases) / len(cases), abs=1e-12)
    assert M.Scorer("accuracy")([" A", "A\n", "A"], ["A"] * 3) == pytest.approx(1 / 3)
    assert changed("accuracy", cases) > 0


def test_scienceqa_is_the_first_character():
    cases = C.scienceqa_cases()
    assert len(cases) >= 50
    # TRACE: answers = datum[0] of prediction and reference, then caculate_accuracy (empty skipped)
    expected = [trace_accuracy(p[:1], t[:1]) for p, t in cases]
    got, _ = per_example("first_char_accuracy", "reference", cases)
    assert got == expected
    assert R.first_char_accuracy(" B", "B\nBecause") == 0.0 and R.first_char_accuracy("B", "B\nx") == 1.0
    assert changed("first_char_accuracy", cases) > 0


# ---- ROUGE-L: the `rouge` package --------------------------------------------------------------------

@pytest.fixture
def deep_recursion():
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # lets the package itself score ~1,100-word sentences (its oracle value)
    yield
    sys.setrecursionlimit(old)


def rouge_package(p, t):
    from rouge import Rouge

    if p == "" or t == "":
        return 0.0
    return Rouge(metrics=["rouge-l"]).get_scores(t, p, avg=True)["rouge-l"]["f"]  # TRACE's order


def test_rouge_l_equals_the_rouge_package(deep_recursion):
    pytest.importorskip("rouge")
    from importlib.metadata import version

    assert version("rouge") == "1.0.1"
    cases = C.summary_cases()
    assert len(cases) >= 50
    got, scorer = per_example("rouge_l", "reference", cases)
    for (p, t), g in zip(cases, got):
        assert g == pytest.approx(rouge_package(p, t), abs=1e-9), (p, t)
    # the iterative rule (the RecursionError fallback) is the package's value on every case
    for p, t in cases:
        if p and t:
            assert R.rouge_l_rule(t, p) == pytest.approx(rouge_package(p, t), abs=1e-9), (p, t)
    assert scorer.fallbacks == {"recursion_error": 0, "value_error": 0}
    assert changed("rouge_l", cases) > 0


def test_rouge_l_fallbacks_are_recorded(deep_recursion):
    pytest.importorskip("rouge")
    long = C.long_sentence_cases()
    expected = [rouge_package(p, t) for p, t in long]  # with the raised limit, the package's own value
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default: the package fails on these
    try:
        with pytest.raises(RecursionError):
            rouge_package(*long[0])
        scorer = M.Scorer("rouge_l")
        got = [scorer([p], [t]) for p, t in long]
    finally:
        sys.setrecursionlimit(old)
    assert got == pytest.approx(expected, abs=1e-9)
    assert scorer.fallbacks["recursion_error"] == len(long)
    # a prediction with no sentence left after splitting on '.': the package raises, TRACE would stop
    with pytest.raises(ValueError):
        rouge_package(".", "The council met.")
    assert scorer(["."], ["The council met."]) == 0.0 and scorer(["..."], ["a"]) == 0.0
    assert scorer.fallbacks["value_error"] == 2


# ---- Py150: fuzzywuzzy on difflib -------------------------------------------------------------------

def trace_postprocess(code):
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in re.findall(r"<(STR|NUM|CHAR)_LIT:(.*?)>", code, re.S):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def test_edit_similarity_equals_fuzzywuzzy_on_difflib():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("fuzzywuzzy runs on python-Levenshtein here; TRACE's requirements give difflib")
    cases = C.code_cases()
    assert len(cases) >= 50
    got, _ = per_example("edit_similarity", "reference", cases)
    for (p, t), g in zip(cases, got):
        a, b = trace_postprocess(p), trace_postprocess(t)
        expected = 0 if a == "" or b == "" else fuzz.ratio(a, b)  # TRACE's caculate_fuzz
        assert round(g * 100) == expected and g * 100 == pytest.approx(expected, abs=1e-9), (p, t)
    assert changed("edit_similarity", cases) > 0
    # literal-only predictions normalise to nothing: 0 (robust: 1 when both sides are empty)
    assert R.edit_similarity("<STR_LIT>", "<CHAR_LIT>") == 0.0 and M.edit_similarity("<STR_LIT>", "<CHAR_LIT>") == 1.0


def test_difflib_and_levenshtein_backends_differ_on_long_code():
    """Why the backend is recorded: on code over 200 characters difflib's popular-character
    heuristic makes its ratio differ from the Levenshtein one."""
    rapidfuzz = pytest.importorskip("rapidfuzz")
    diffs = [abs(R.fuzz_ratio(R.postprocess_code(p), R.postprocess_code(t))
                 - rapidfuzz.fuzz.ratio(R.postprocess_code(p), R.postprocess_code(t)))
             for p, t in C.code_cases() if len(t) > 200]
    assert max(diffs) >= 1


# ---- SARI: Hugging Face's definition ----------------------------------------------------------------

def sari_oracle(source, prediction, references):
    """SARI as Hugging Face's `sari` metric defines it (n = 1..4; keep F1, deletion precision, addition
    F1; source/candidate counts replicated per reference; 0/0 = 1; keep recall over the total count),
    on sacrebleu's 13a tokens of the lower-cased text. Written from the definition, strings as n-grams."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    norm = lambda s: tok(s.lower()).split(" ")  # noqa: E731
    s_tok, c_tok, r_toks = norm(source), norm(prediction), [norm(r) for r in references]
    k = len(references)

    def grams(tokens, n):
        return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]

    def f1(p, r):
        return 2 * p * r / (p + r) if p > 0 or r > 0 else 0.0

    keeps, dels, adds = [], [], []
    for n in range(1, 5):
        S = Counter({g: c * k for g, c in Counter(grams(s_tok, n)).items()})
        Cn = Counter({g: c * k for g, c in Counter(grams(c_tok, n)).items()})
        Rall = Counter()
        for r in r_toks:
            Rall += Counter(grams(r, n))
        kept, kept_ok, keep_all = S & Cn, (S & Cn) & Rall, S & Rall
        kp = sum(kept_ok[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
        kr = sum(kept_ok[g] for g in kept) / sum(keep_all.values()) if keep_all else 1.0
        keeps.append(f1(kp, kr))
        deleted = S - Cn
        deleted_ok = deleted - Rall
        dels.append(sum(deleted_ok[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0)
        added = set(Cn) - set(S)
        added_ok = added & set(Rall)
        add_all = set(Rall) - set(S)
        ap = len(added_ok) / len(added) if added else 1.0
        ar = len(added_ok) / len(add_all) if add_all else 1.0
        adds.append(f1(ap, ar))
    return (sum(keeps) / 4 + sum(dels) / 4 + sum(adds) / 4) / 3


def test_sari_equals_huggingface_definition_including_empty_predictions():
    pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    cases = C.simplification_cases()
    assert len(cases) >= 50
    got, _ = per_example("sari", "reference", cases)
    for (p, r, s), g in zip(cases, got):
        assert g == pytest.approx(sari_oracle(s, p, [r]), abs=1e-9), (p, r, s)
    empties = [g for (p, _, _), g in zip(cases, got) if not p.strip()]
    assert empties and all(g > 0.1 for g in empties)  # HF scores them (deletions count), robust gives 0
    corpus = M.Scorer("sari")([p for p, _, _ in cases], [r for _, r, _ in cases], [s for _, _, s in cases])
    assert corpus == pytest.approx(sum(sari_oracle(s, p, [r]) for p, r, s in cases) / len(cases), abs=1e-9)
    # the 13a tokenisation used here is sacrebleu's, on every text of the cases
    tok = Tokenizer13a()
    for p, r, s in cases:
        for text in (p, r, s):
            assert M.tokenize_13a(text.lower()) == tok(text.lower())
    assert changed("sari", cases) == len(empties)


# ---- the benchmark wires the mode through ------------------------------------------------------------

def test_benchmark_scoring_mode_and_decoding(tmp_path):
    from cl_merge.benchmarks.trace import fixtures as F
    from cl_merge.benchmarks.trace.benchmark import TraceBenchmark
    from cl_merge.models.hf_causal_lm import CausalLMAdapter, load_causal_lm

    F.write_synthetic_tasks(tmp_path, n_train=4, n_eval=2, n_test=2, tasks=["ScienceQA", "MeetingBank"])
    for scoring, cleanup in (("reference", False), ("robust", None)):
        bench = TraceBenchmark(data_dir=str(tmp_path), tasks=("ScienceQA", "MeetingBank"), scoring=scoring)
        stream = bench.build_stream(1, 0)
        assert [t.evaluator.scorer.scoring for t in stream] == [scoring, scoring]
        detail = stream.results_detail()
        assert detail["scoring"] == scoring and detail["decoding"]["clean_up_tokenization_spaces"] is cleanup
        assert set(detail["scorer_versions"]) >= {"rouge", "rouge-score", "fuzzywuzzy", "rapidfuzz"}
        assert bench.clean_up_tokenization_spaces() is cleanup
    # the adapter decodes with the setting it was given
    F.write_tiny_model(tmp_path / "model")
    model, tok = load_causal_lm(str(tmp_path / "model"))
    seen = []
    original = tok.decode

    def spy(*args, **kwargs):
        seen.append(kwargs.get("clean_up_tokenization_spaces", "default"))
        return original(*args, **kwargs)

    tok.decode = spy
    CausalLMAdapter(model, tok, "tiny", clean_up_tokenization_spaces=False).generate(["a"], max_new_tokens=2)
    assert seen == [False]


def test_scorer_versions_are_null_when_absent():
    from cl_merge.benchmarks.scorer_versions import package_version, scorer_versions

    assert package_version("no-such-package-for-cl-merge") is None
    versions = scorer_versions()
    assert versions["rouge"] == "1.0.1" or versions["rouge"] is None
    assert {"rouge", "rouge-score", "fuzzywuzzy", "rapidfuzz", "lm_eval", "evalplus"} <= set(versions)
