"""Offline stand-ins for dry runs and tests: a tiny randomly initialised Llama with a byte-level
tokenizer built locally (nothing downloaded), and synthetic tasks in TRACE's layout.

    python -m cl_merge.benchmarks.trace.fixtures OUT_DIR
    cl-merge run --benchmark trace --strategy c-ft benchmark.model=OUT_DIR/model \\
        benchmark.data_dir=OUT_DIR/data benchmark.tasks=C-STANCE,ScienceQA,MeetingBank,Py150,20Minuten \\
        learner.steps=60 learner.lr=3e-3

The synthetic tasks (all eight of TRACE's names, answers in each task's own format) share one pool
of prompts' content words and give them *conflicting* answers (each task its own rule), so
sequential fine-tuning forgets.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

SPECIALS = ["<s>", "</s>", "<pad>"]
WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean"]

# One rule per task, answers in the format TRACE's data uses for that task (what its scorer expects):
# C-STANCE and FOMC an option letter alone, ScienceQA the letter then "\n" and the reasoning (TRACE
# reads the first character), NumGLUE a bare number, MeetingBank a summary sentence, Py150 a code
# line with TRACE's <EOL> and literal tokens, 20Minuten a simplified German sentence. Answers are
# short so that generation stays cheap; every rule maps the same words to different strings.
_LETTERS = "ABC"
_GERMAN = ["Apfel", "Fluss", "Stein", "Wolke", "Ahorn", "Tiger", "Zitrone", "Ozean"]


def _answer(task: str, i: int, w: str) -> str:
    if task == "C-STANCE":  # exact match over 3 option letters
        return _LETTERS[i % 3]
    if task == "FOMC":  # exact match over 3 option letters, another rule
        return _LETTERS[(i + 1) % 3]
    if task == "ScienceQA":  # first character (option letter), then the reasoning
        return f"{'ABCD'[(i * 3 + 1) % 4]}\nBecause {w[:3]}."
    if task == "NumGLUE-cm":  # exact match on a number
        return str(len(w) + i)
    if task == "NumGLUE-ds":
        return str(i * 2)
    if task == "MeetingBank":  # ROUGE-L: a one-sentence summary
        return f"The {WORDS[(i + 3) % 8]} {WORDS[(i + 5) % 8]} was approved."
    if task == "Py150":  # edit similarity on a code line with literal tokens
        return f"x = {w[::-1]} ( <NUM_LIT:{i}> ) <EOL>"
    if task == "20Minuten":  # SARI: the German source sentence simplified
        return f"Der {_GERMAN[i]} ist gross."
    raise ValueError(task)


_PROMPT = {
    "C-STANCE": "Stance towards {w}? A. favor, B. against, C. neutral. Answer A, B or C.\n",
    "FOMC": "Monetary policy stance of: {w} rates\nA. dovish, B. hawkish, C. neutral. Choose one from A, B and C.\n",
    "ScienceQA": "Question about {w}? Choices: A B C D\n",
    "NumGLUE-cm": "How many letters in {w}, plus its rank?\n",
    "NumGLUE-ds": "Twice the rank of {w}?\n",
    "MeetingBank": "Summarize: {w} meeting\nSummary:",
    "Py150": "Complete: def {w} ( ) : <EOL>",
    "20Minuten": "Vereinfache: Der sehr alte {w} ist ein grosser {w2}.\n",
}
SYNTHETIC_TASKS = list(_PROMPT)


def synthetic_records(task: str, n: int, seed: int) -> List[Dict[str, str]]:
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        i = rng.randrange(len(WORDS))
        w = WORDS[i]
        out.append({"prompt": _PROMPT[task].format(w=w, w2=WORDS[(i + 1) % 8]), "answer": _answer(task, i, w)})
    return out


def write_synthetic_tasks(root: Path, n_train: int = 64, n_eval: int = 8, n_test: int = 8, seed: int = 0,
                          tasks=None) -> Path:
    root = Path(root)
    for task in tasks or SYNTHETIC_TASKS:
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        for k, (split, n) in enumerate((("train", n_train), ("eval", n_eval), ("test", n_test))):
            records = synthetic_records(task, n, 3 * seed + k)
            (folder / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False, indent=0))
    return root


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte symbols + <s>, </s>, <pad>), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 96, layers: int = 2, init_std: float = 0.1):
    """A randomly initialised Llama of a few hundred thousand parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, initializer_range=init_std, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    folder = Path(folder)
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m cl_merge.benchmarks.trace.fixtures",
        description="Write a tiny random Llama (OUT_DIR/model) and synthetic tasks in TRACE's answer formats "
                    "(OUT_DIR/data) for an offline dry run of the TRACE benchmark.")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write model/ and data/ into")
    args = parser.parse_args(argv)
    out = args.out_dir
    write_tiny_model(out / "model")
    write_synthetic_tasks(out / "data")
    print(f"wrote {out / 'model'} and {out / 'data'} ({', '.join(SYNTHETIC_TASKS)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
