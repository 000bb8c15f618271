"""CLIP-style contrastive pre-training of the mini suite's tiny open_clip model.

Run once (the result is shipped in ``weights/``)::

    python -m cl_merge.benchmarks.mini.pretrain      # from any directory (the installed package)

``load_pretrained()`` builds the model from ``model_config/cl-merge-mini-vit.json`` and loads the
shipped weights (stored in fp16, returned in fp32, eval mode).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cl_merge.torchvision_shim  # noqa: F401  (must precede the open_clip import)
import open_clip

from .captions import ATTRIBUTES, pretrain_corpus_with_meta
from .data import ATTRIBUTE_PROMPTS

HERE = Path(__file__).resolve().parent
MODEL_NAME = "cl-merge-mini-vit"
CONFIG_DIR = HERE / "model_config"
WEIGHTS_FILE = HERE / "weights" / f"{MODEL_NAME}.safetensors"

# Defaults of the shipped weights (see weights/cl-merge-mini-vit.json for the recorded run).
DEFAULT_STEPS = 4000
DEFAULT_BATCH_SIZE = 128
DEFAULT_CORPUS = 40_000
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 0.1
DEFAULT_WARMUP = 50
DEFAULT_PROMPT_CAPTIONS = 1


def register_config() -> None:
    """Make ``cl-merge-mini-vit`` known to open_clip (idempotent)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR / f"{MODEL_NAME}.json")


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns that a model built with ``pretrained=None`` is randomly initialised; every caller
    here loads the shipped weights next (or pre-trains), so the line would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_model() -> open_clip.CLIP:
    """A randomly initialised model of the mini architecture (fp32, CPU)."""
    register_config()
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(MODEL_NAME, pretrained=None, device="cpu")
    finally:
        logging.getLogger().removeFilter(quiet)


def load_tokenizer():
    register_config()
    return open_clip.get_tokenizer(MODEL_NAME)


def normalise(images: np.ndarray, model) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W normalised with the model's own mean/std."""
    cfg = model.visual.preprocess_cfg
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def load_pretrained(path: str | Path | None = None) -> open_clip.CLIP:
    """The pre-trained mini CLIP: architecture from the config, shipped weights, fp32, eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"mini CLIP weights not found at {path}; run `python -m cl_merge.benchmarks.mini.pretrain`")
    model = create_model()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@torch.no_grad()
def _centre_init(model, images: torch.Tensor, tokens: torch.Tensor) -> None:
    """Data-dependent init: shift the final LayerNorm biases of both towers so that, on a sample,
    the pooled features (hence the embeddings) are centred. A fresh ViT maps all images to nearly
    the same direction (cosine ~0.86 here), which lets the text tower collapse every caption onto
    it before the image tower has learnt anything but colour; centred embeddings avoid that."""
    captured = {}

    def grab(name):
        def hook(_module, _inputs, output):
            captured[name] = output
        return hook

    handles = [model.visual.ln_post.register_forward_hook(grab("visual")),
               model.ln_final.register_forward_hook(grab("text"))]
    try:
        model.encode_image(images)
        model.encode_text(tokens)
    finally:
        for h in handles:
            h.remove()
    visual = captured["visual"]
    visual = visual[:, 0] if visual.ndim == 3 else visual  # class token (pool_type 'tok')
    model.visual.ln_post.bias -= visual.mean(dim=0)
    text = captured["text"][torch.arange(len(tokens)), tokens.argmax(dim=-1)]  # the eot positions
    model.ln_final.bias -= text.mean(dim=0)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    corpus_size: int = DEFAULT_CORPUS,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup: int = DEFAULT_WARMUP,
    text_lr_mult: float = 1.0,
    prompt_captions: int = DEFAULT_PROMPT_CAPTIONS,
    centre_init: bool = True,
    init_logit_scale: float | None = None,
    stats: dict | None = None,
) -> open_clip.CLIP:
    """Contrastive (CLIP) pre-training on ``pretrain_corpus``; returns the model in eval mode.

    The loss is the symmetric image/text cross-entropy (CLIP) with multi-positive soft targets:
    a caption counts as a positive of every image in the batch it is true of (captions mention
    only some attributes, e.g. "a photo of a circle."), so true matches are never pushed apart.
    Deterministic for a given seed. ``stats`` (optional dict)
    receives the final loss and timings.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    t_start = time.time()
    det_before = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        model = create_model()
        tokenizer = load_tokenizer()
        images, captions, scenes, mentions = pretrain_corpus_with_meta(corpus_size, seed)
        scenes, mentions = torch.from_numpy(scenes), torch.from_numpy(mentions)
        x_all = normalise(images, model)
        uniq, caption_ids = np.unique(np.array(captions, dtype=object).astype(str), return_inverse=True)
        tokens_uniq = tokenizer(list(uniq))
        caption_ids = torch.from_numpy(caption_ids.astype(np.int64))
        # every attribute prompt (attribute x class x template), for the extra prompt captions
        prompts, prompt_attr, prompt_offset, prompt_ntpl = [], [], [], []
        for spec in ATTRIBUTE_PROMPTS:
            prompt_attr.append(ATTRIBUTES.index(spec.name))
            prompt_offset.append(len(prompts))
            prompt_ntpl.append(len(spec.templates))
            prompts += [t.format(c) for c in spec.classnames for t in spec.templates]
        prompt_tokens = tokenizer(prompts)
        prompt_attr, prompt_offset, prompt_ntpl = (torch.tensor(v) for v in (prompt_attr, prompt_offset, prompt_ntpl))
        t_data = time.time() - t_start

        if centre_init:
            sample = torch.arange(min(corpus_size, 1024))
            _centre_init(model, x_all[sample], tokens_uniq[caption_ids[sample]])
        if init_logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(math.log(init_logit_scale))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in model.named_parameters():
            is_text = not name.startswith("visual.") and "logit_scale" not in name
            no_decay = p.ndim < 2 or "logit_scale" in name or "embedding" in name
            groups.setdefault((is_text, no_decay), []).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_mult": text_lr_mult if tx else 1.0}
                for (tx, nd), ps in sorted(groups.items())
            ],
            lr=lr, betas=(0.9, 0.98), eps=1e-6,
        )
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(corpus_size, generator=gen)
        cursor = 0
        model.train()
        ema_loss = None
        history: list[float] = []
        columns = [TextColumn("pretraining mini CLIP"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress, transient=False) as bar:
            job = bar.add_task("pretrain", total=steps, loss="-")
            for step in range(steps):
                if cursor + batch_size > corpus_size:
                    perm = torch.randperm(corpus_size, generator=gen)
                    cursor = 0
                idx = perm[cursor : cursor + batch_size]
                cursor += batch_size
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, steps, lr, warmup) * group["lr_mult"]
                s_img = scenes[idx]
                tokens, s_cap, m_cap = [tokens_uniq[caption_ids[idx]]], [s_img], [mentions[idx]]
                for _ in range(prompt_captions):
                    # one extra caption per image: a task prompt about one of its attributes
                    task = torch.randint(len(ATTRIBUTE_PROMPTS), (len(idx),), generator=gen)
                    template = torch.randint(1 << 30, (len(idx),), generator=gen)
                    attr = prompt_attr[task]
                    cls = s_img.gather(1, attr[:, None])[:, 0]
                    row = prompt_offset[task] + cls * prompt_ntpl[task] + template % prompt_ntpl[task]
                    tokens.append(prompt_tokens[row])
                    s_cap.append(s_img)
                    m_cap.append(F.one_hot(attr, len(ATTRIBUTES)).bool())
                s_cap, m_cap = torch.cat(s_cap), torch.cat(m_cap)
                img = model.encode_image(x_all[idx], normalize=True)
                txt = model.encode_text(torch.cat(tokens), normalize=True)
                logits = model.logit_scale.exp() * img @ txt.T
                # fits[i, j]: caption i is true of image j (it agrees on every attribute it mentions)
                fits = ((s_img[None, :, :] == s_cap[:, None, :]) | ~m_cap[:, None, :]).all(dim=2).float()
                t2i = fits / fits.sum(dim=1, keepdim=True)
                i2t = fits.T / fits.T.sum(dim=1, keepdim=True)
                loss = 0.5 * (
                    torch.sum(-i2t * F.log_softmax(logits, dim=1), dim=1).mean()
                    + torch.sum(-t2i * F.log_softmax(logits.T, dim=1), dim=1).mean()
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                value = float(loss.detach())
                ema_loss = value if ema_loss is None else 0.95 * ema_loss + 0.05 * value
                history.append(value)
                bar.update(job, advance=1, loss=f"{ema_loss:.3f}")
        model.eval()
    finally:
        torch.use_deterministic_algorithms(det_before)
    if stats is not None:
        stats.update(history=history, final_loss=ema_loss, last_batch_loss=value, data_seconds=round(t_data, 2),
                     seconds=round(time.time() - t_start, 2), logit_scale=float(model.logit_scale.detach().exp()))
    return model


def save_weights(model, path: Path) -> str:
    """Store the state dict in fp16 safetensors; returns the file's sha256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model": MODEL_NAME, "dtype": "float16"})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cl_merge.benchmarks.mini.pretrain",
                                     description="Pre-train the mini suite's tiny CLIP and write its weights.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="captioned images per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and the initialization")
    parser.add_argument("--corpus-size", type=int, default=DEFAULT_CORPUS, help="generated captioned images")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak AdamW learning rate")
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE,
                        help="weights file (its .json record is written beside it); the default replaces the "
                             "shipped weights")
    parser.add_argument("--no-progress", action="store_true", help="no live progress")
    args = parser.parse_args(argv)

    stats: dict = {}
    model = pretrain(steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                     corpus_size=args.corpus_size, lr=args.lr, stats=stats)
    sha = save_weights(model, args.out)
    record = {
        "model": MODEL_NAME,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "corpus_size": args.corpus_size,
        "lr": args.lr,
        "weight_decay": DEFAULT_WEIGHT_DECAY,
        "warmup": DEFAULT_WARMUP,
        "final_loss": round(stats["final_loss"], 4),
        "logit_scale": round(stats["logit_scale"], 3),
        "data_seconds": stats["data_seconds"],
        "seconds": stats["seconds"],
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "file": args.out.name,
        "bytes": args.out.stat().st_size,
        "sha256": sha,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
