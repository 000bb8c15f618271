"""open_clip image classifier: the image tower is trained and merged; per-task zero-shot heads
(built from class names x templates through the text tower) stay frozen."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..progress import batches
from ..task import Task
from .base import ModelAdapter


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: identifies pre-trained weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


class ClipClassifier(ModelAdapter):
    def __init__(self, model, tokenizer, model_id: str, head_cache_dir: Optional[os.PathLike] = None,
                 device: str = "cpu", eval_batch_size: int = 256, num_workers: int = 0,
                 precision: str = "fp32"):
        if precision not in _AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_AUTOCAST_DTYPES)}; got {precision!r}")
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._visual = dict(self.model.visual.named_parameters())
        for p in self._visual.values():
            p.requires_grad_(True)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.head_cache_dir = Path(head_cache_dir) if head_cache_dir else None
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._device = torch.device(device)
        # mixed precision (autocast; weights and gradients stay fp32) applies on CUDA only
        self.precision = precision if self._device.type == "cuda" else "fp32"
        # page-locked host batches let the copies to the GPU overlap compute (non_blocking below)
        self._pin_memory = self._device.type == "cuda"
        self._fingerprint = state_fingerprint(self.model)
        self._heads: Dict[str, torch.Tensor] = {}
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    # ---- parameters -------------------------------------------------------------------------
    def trainable_parameters(self) -> Dict[str, torch.nn.Parameter]:
        return self._visual

    def base_fingerprint(self) -> str:
        return self._fingerprint

    # ---- heads ------------------------------------------------------------------------------
    def _head_key(self, task: Task) -> str:
        payload = json.dumps([self.model_id, self._fingerprint, task.name, list(task.classnames),
                              list(task.templates)])
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def prepare(self, task: Task) -> None:
        self.head(task)

    def head(self, task: Task) -> torch.Tensor:
        """Zero-shot head (classes x dim): per class, encode all templates, normalise, average,
        normalise again (open_clip's build_zero_shot_classifier). Cached in memory and on disk."""
        if task.name in self._heads:
            return self._heads[task.name]
        path = self.head_cache_dir / f"{task.name}-{self._head_key(task)}.safetensors" if self.head_cache_dir else None
        weights = self._cached_head(path, task) if path is not None and path.exists() else None
        if weights is None:
            from open_clip import build_zero_shot_classifier

            with torch.no_grad():
                weights = build_zero_shot_classifier(
                    self.model, self.tokenizer, list(task.classnames), list(task.templates),
                    num_classes_per_batch=None, device=self._device,
                ).T.contiguous().cpu()
            if path is not None:
                from ..io import save_tensors_atomic

                save_tensors_atomic(path, {"head": weights})
        self._heads[task.name] = weights.to(self._device)
        return self._heads[task.name]

    def _cached_head(self, path: Path, task: Task) -> Optional[torch.Tensor]:
        """The head stored at ``path`` if its content hash, shape and dtype are what this model builds;
        otherwise None (after one warning line): it is rebuilt, never trusted."""
        from ..io import DamagedFile, load_tensors, warn

        try:
            weights = load_tensors(path).get("head")
            why = None if weights is not None else "no 'head' tensor"
        except DamagedFile as exc:
            weights, why = None, exc.reason
        except FileNotFoundError:
            return None
        if weights is not None:
            dim = getattr(self.model.visual, "output_dim", None)
            dtype = next(self.model.parameters()).dtype
            shape = (task.classes, dim if dim is not None else weights.shape[-1])
            if tuple(weights.shape) != shape or weights.dtype != dtype:
                why = f"shape {tuple(weights.shape)} {weights.dtype}, the model needs {shape} {dtype}"
        if why is not None:
            warn(f"cached head {path} cannot be used ({why}); rebuilding it")
            return None
        return weights

    # ---- training and evaluation ------------------------------------------------------------
    def logits(self, images: torch.Tensor, task: Task) -> torch.Tensor:
        dtype = _AUTOCAST_DTYPES[self.precision]
        with torch.autocast(device_type=self._device.type, dtype=dtype, enabled=dtype is not None):
            features = self.model.encode_image(images.to(self._device, non_blocking=True), normalize=True)
            logits = self.logit_scale * features @ self.head(task).T
        return logits.float()

    def loss(self, batch, task: Task) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.logits(images, task), labels.to(self._device))

    def per_sample_loss(self, task: Task):
        """Cross-entropy of one (image, label) through the image tower called with the given
        parameters (``functional_call``) and the frozen zero-shot head: ``loss`` on a batch of one."""
        from torch.func import functional_call

        visual, head, scale, device = self.model.visual, self.head(task), self.logit_scale, self._device

        def loss(params, image, label):
            features = functional_call(visual, params, (image.unsqueeze(0).to(device),))
            logits = scale * F.normalize(features, dim=-1) @ head.T
            return F.cross_entropy(logits.float(), label.reshape(1).to(device))

        return loss

    def train_batches(self, task: Task, batch_size: int, steps: int, generator: torch.Generator) -> Iterator:
        return _cycle(task.train, batch_size, steps, generator, self.num_workers, self._pin_memory)

    @torch.no_grad()
    def predict(self, dataset: Dataset, task: Task) -> torch.Tensor:
        loader = DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                            num_workers=self.num_workers, pin_memory=self._pin_memory)
        return torch.cat([self.logits(x, task).argmax(-1).cpu() for x, _ in loader])

    @torch.no_grad()
    def score(self, task: Task, split: str = "test") -> float:
        dataset = task.split(split)
        if hasattr(dataset, "iter_batches"):
            # pre-processed splits (e.g. vision20's uint8 caches) normalise whole batches on the device
            loader = dataset.iter_batches(self.eval_batch_size, self._device)
        else:
            loader = DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                                num_workers=self.num_workers, pin_memory=self._pin_memory)
        correct = total = 0
        n_batches = -(-len(dataset) // self.eval_batch_size) if hasattr(dataset, "__len__") else None
        for images, labels in batches(loader, n_batches, f"evaluate {task.name} ({split})"):
            pred = self.logits(images, task).argmax(-1).cpu()
            correct += int((pred == labels).sum())
            total += len(labels)
        return correct / max(total, 1)


_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cycle(dataset: Dataset, batch_size: int, steps: int, generator: torch.Generator, num_workers: int,
           pin_memory: bool = False):
    done = 0
    while done < steps:
        loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                            drop_last=True, generator=generator, num_workers=num_workers,
                            pin_memory=pin_memory)
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return
