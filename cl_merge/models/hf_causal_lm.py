"""Hugging Face causal language model (transformers ``AutoModelForCausalLM`` + its tokenizer).

What the protocol, learners and mergers see (docs/extending.md, "A benchmark"):

* **mergeable parameters**: every transformer weight except the token embeddings and the LM head
  (their SVDs are huge and MergeBench leaves them out); ``include_embeddings=True`` adds both. The
  parameters outside that set are frozen (they are not trained either).
* **a batch** is a list of ``{"prompt", "answer"}`` records (so replay can mix tasks' records);
  ``loss`` tokenises it: ``prompt`` (with the tokenizer's BOS) + ``answer`` + EOS, right-padded,
  and the cross-entropy covers the answer tokens and the EOS only (prompt and padding are -100).
  Sequences longer than ``max_length`` lose prompt tokens from the left (the answer is kept;
  an answer longer than ``max_length`` itself is cut at its end).
* **evaluation**: batched generation from left-padded prompts, greedy by default. TRACE samples at
  temperature 0.1, which makes the matrix non-reproducible: ``temperature > 0`` samples (seeded
  with ``generation_seed`` for every evaluation call), and the benchmark records the setting.

On GPU, ``precision="bf16"`` runs forward/backward under bf16 autocast with fp32 master weights
(the Adam update of fp32 weights; pure-bf16 weights would lose lr 2e-5 updates to rounding), and
``gradient_checkpointing=True`` recomputes activations in the backward pass (sequence length 2048).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..errors import UserError
from ..progress import batches
from ..task import Task
from .base import ModelAdapter

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(model: str, device: str = "cpu", local_files_only: Optional[bool] = None,
                   revision: Optional[str] = None):
    """(model, tokenizer) from a hub id or a local folder (``save_pretrained`` layout), fp32 weights.

    A gated model (Llama 3.2) needs ``huggingface-cli login`` once on a machine with network; offline
    machines set ``HF_HUB_OFFLINE=1`` and use the cache or a local folder.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if local_files_only is None:
        local_files_only = Path(model).is_dir()
    kwargs = dict(local_files_only=local_files_only, revision=revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load causal LM '{model}': {first} -- give benchmark.model a local "
                        f"folder written by save_pretrained or a hub id available in the HF cache "
                        f"(gated models need `huggingface-cli login` on a machine with network)") from None
    return lm.to(device), tokenizer


class CausalLMAdapter(ModelAdapter):
    def __init__(self, model, tokenizer, model_id: str, device: str = "cpu", max_length: int = 2048,
                 max_new_tokens: int = 512, eval_batch_size: int = 16, include_embeddings: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, generation_seed: int = 0,
                 precision: str = "fp32", gradient_checkpointing: bool = False,
                 clean_up_tokenization_spaces: Optional[bool] = None):
        if precision not in _AUTOCAST:
            raise UserError(f"precision must be one of {', '.join(_AUTOCAST)}; got {precision!r}")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
        if max_length < 2:
            raise UserError(f"max_length must be >= 2; got {max_length}")
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.include_embeddings = include_embeddings
        self.temperature = temperature
        self.top_p = top_p
        self.generation_seed = generation_seed
        self.precision = precision if self._device.type == "cuda" else "fp32"
        # None: the tokenizer's own default; TRACE decodes with False (no " ." -> "." rewriting)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.num_workers = 0
        if tokenizer.pad_token_id is None:  # Llama 3 has no pad token: pad with EOS (masked anyway)
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise UserError(f"tokenizer of {model_id} has no EOS token; answers need an end marker")
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        excluded = set()
        if not include_embeddings:
            for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                if module is not None:
                    excluded.update(id(p) for p in module.parameters())
        self._params: Dict[str, torch.nn.Parameter] = {}
        for name, p in self.model.named_parameters():  # tied weights appear once
            keep = id(p) not in excluded
            p.requires_grad_(keep)
            if keep:
                self._params[name] = p
        if not self._params:
            raise UserError(f"{model_id}: no mergeable parameters (every weight is an embedding or the LM head)")
        self._fingerprint = _fingerprint(self.model, model_id)

    # ---- parameters -------------------------------------------------------------------------
    def trainable_parameters(self) -> Dict[str, torch.nn.Parameter]:
        return self._params

    def base_fingerprint(self) -> str:
        return self._fingerprint

    def prepare(self, task: Task) -> None:
        return None  # no per-task head: the task's answers are text

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- tokenisation -----------------------------------------------------------------------
    def encode(self, prompt: str, answer: str):
        """(input_ids, labels) of one example; labels are -100 on the prompt."""
        tok = self.tokenizer
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        a_ids = a_ids[: self.max_length - 1]
        room = self.max_length - len(a_ids)
        if len(p_ids) > room:  # keep the BOS (if any) and the end of the prompt
            bos = tok.bos_token_id
            head = [p_ids[0]] if (bos is not None and p_ids and p_ids[0] == bos) else []
            p_ids = head + p_ids[len(p_ids) - (room - len(head)):] if room > len(head) else p_ids[:room]
        return p_ids + a_ids, [-100] * len(p_ids) + a_ids

    def collate(self, batch: Sequence[dict]):
        """Right-padded input_ids, attention_mask and answer-only labels for a list of records."""
        pairs = [self.encode(r["prompt"], r["answer"]) for r in batch]
        width = max(len(ids) for ids, _ in pairs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (x, y) in enumerate(pairs):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        return ids, mask, labels

    # ---- training ---------------------------------------------------------------------------
    def _autocast(self):
        dtype = _AUTOCAST[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=dtype)

    def loss(self, batch, task: Task) -> torch.Tensor:
        """Mean token cross-entropy over the batch's answer tokens (+ EOS)."""
        ids, mask, labels = self.collate(batch)
        ids, mask, labels = ids.to(self._device), mask.to(self._device), labels.to(self._device)
        if self.gradient_checkpointing:
            self.model.train()  # transformers only checkpoints in training mode (Llama has no dropout)
        try:
            with self._autocast():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            self.model.eval()
        # position t predicts token t+1
        logits = logits[:, :-1].float()
        target = labels[:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100)

    # ---- functional per-sample loss (the Fisher diagonal, cl_merge.fisher) -------------------------
    def collate_samples(self, records: Sequence[dict]):
        """(input_ids, labels) of a list of records, right-padded (pad tokens, label -100): the Fisher
        estimator's batches, one sample per row for ``per_sample_loss``."""
        ids, _, labels = self.collate(records)
        return ids, labels

    def per_sample_loss(self, task: Task):
        """``loss(params, input_ids, labels)``: ``loss`` of ONE record (answer tokens + EOS, mean token
        cross-entropy) through the model called with the given mergeable parameters (``functional_call``;
        the frozen embeddings and head are the module's own). A row of ``collate_samples`` is right-padded
        and has no attention mask: with causal attention no real token sees the padding after it, and
        the padding's labels are -100, so the value is that of the unpadded record."""
        from torch.func import functional_call

        model, device = self.model, self._device

        def loss(params, input_ids, labels):
            with self._autocast():
                out = functional_call(model, params, (input_ids[None].to(device),), {"use_cache": False},
                                      strict=False)
            logits = out.logits[:, :-1].float()
            target = labels[None, 1:].to(device)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100)

        return loss

    def train_batches(self, task: Task, batch_size: int, steps: int, generator: torch.Generator) -> Iterator:
        """``steps`` lists of records, reshuffled every epoch with ``generator``, full batches only."""
        data = task.train
        n = len(data)
        if n == 0:
            raise UserError(f"task {task.name} has no training examples")
        size = min(batch_size, n)
        done = 0
        while done < steps:
            order = torch.randperm(n, generator=generator).tolist()
            for start in range(0, n - size + 1, size):
                yield [data[i] for i in order[start:start + size]]
                done += 1
                if done == steps:
                    return

    # ---- generation and scoring -------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: Optional[int] = None, *,
                 num_samples: int = 1, temperature: Optional[float] = None, top_p: Optional[float] = None,
                 max_total_tokens: Optional[int] = None, seed: Optional[int] = None,
                 add_special_tokens: bool = True) -> List:
        """Completions of ``prompts`` (left-padded batches); greedy unless the temperature is > 0.

        The keyword arguments override the adapter's settings for one call (MergeBench's coding
        protocol): ``num_samples`` > 1 returns a list of that many completions per prompt;
        ``max_total_tokens`` caps prompt + completion (bigcode's ``max_length_generation``) instead
        of the new tokens alone; ``add_special_tokens=False`` for prompts that already carry the
        BOS (chat-template output)."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        temperature = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        seed = self.generation_seed if seed is None else seed
        budget = int(max_new_tokens or self.max_new_tokens)
        room = max(self.max_length - budget, 1)
        sample = temperature > 0
        if num_samples > 1 and not sample:
            raise UserError(f"{num_samples} samples per prompt need a temperature > 0")
        config = GenerationConfig(max_new_tokens=budget, do_sample=sample,
                                  temperature=temperature if sample else None,
                                  top_p=top_p if sample else None, top_k=None if not sample else 0,
                                  num_return_sequences=num_samples,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.bos_token_id)
        decode_kwargs = {"skip_special_tokens": True}
        if self.clean_up_tokenization_spaces is not None:
            decode_kwargs["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        outputs: List = []
        self.model.eval()
        with _fork_rng(self._device, seed if sample else None):
            starts = range(0, len(prompts), self.eval_batch_size)
            for start in batches(starts, len(starts), "generate batches"):
                encoded = [tok(p, add_special_tokens=add_special_tokens)["input_ids"]
                           for p in prompts[start:start + self.eval_batch_size]]
                encoded = [e[-room:] if len(e) > room else e for e in encoded]
                width = max(len(e) for e in encoded)
                if max_total_tokens is not None:  # the longest prompt of the batch sets the room left
                    config.max_new_tokens = max(1, min(budget, max_total_tokens - width))
                ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(encoded), width), dtype=torch.long)
                for i, e in enumerate(encoded):  # left padding: every prompt ends at the last column
                    ids[i, width - len(e):] = torch.tensor(e)
                    mask[i, width - len(e):] = 1
                with self._autocast():
                    out = self.model.generate(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                              generation_config=config)
                texts = [tok.decode(row, **decode_kwargs) for row in out[:, width:].cpu()]
                if num_samples > 1:  # generate() returns each prompt's samples next to each other
                    texts = [texts[i:i + num_samples] for i in range(0, len(texts), num_samples)]
                outputs.extend(texts)
        return outputs

    @torch.no_grad()
    def score(self, task: Task, split: str = "test") -> float:
        """Default score (tasks normally bring their own metric): exact match after stripping."""
        records = list(task.split(split))
        if not records:
            return 0.0
        preds = self.generate([r["prompt"] for r in records])
        return sum(p.strip() == r["answer"].strip() and bool(p.strip()) for p, r in zip(preds, records)) / len(records)

    def decoding(self) -> Dict[str, object]:
        """The generation settings, for the results."""
        return {"strategy": "sample" if self.temperature > 0 else "greedy", "temperature": self.temperature,
                "top_p": self.top_p if self.temperature > 0 else None,
                "seed": self.generation_seed if self.temperature > 0 else None,
                "max_new_tokens": self.max_new_tokens, "padding_side": "left",
                "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}


@contextlib.contextmanager
def _fork_rng(device: torch.device, seed: Optional[int]):
    """Sampling draws from a fixed seed without disturbing the training RNG; greedy needs none."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _fingerprint(model, model_id: str) -> str:
    """sha256 over the model id, parameter names, shapes and a strided sample of every tensor's
    values (hashing all bytes of a 3B model takes minutes; the sample still separates checkpoints)."""
    h = hashlib.sha256(model_id.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().reshape(-1)
        step = max(1, t.numel() // 4096)
        sample = t[::step][:4096].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
