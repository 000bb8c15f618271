"""The open_clip backbone of the suite (ViT-B-32 / ViT-B-16 / ViT-L-14 with OpenAI weights, a local
checkpoint, or random initialisation) and its image preprocessing."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import cl_merge.torchvision_shim  # noqa: F401  (must precede the open_clip import)
import numpy as np
import open_clip
import torch

from cl_merge.errors import UserError

#: the architectures the suite is defined on (OpenAI CLIP; their weights were trained with QuickGELU)
OPENAI_ARCHITECTURES = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
MINI_MODEL = "cl-merge-mini-vit"
_NO_WEIGHTS = {"", "none", "null", "random"}
RANDOM_INIT_SEED = 0


def resolve_model_name(model: str) -> str:
    """An open_clip model name for ``model``: a built-in name, the mini suite's tiny config, or a path to
    a model config JSON (registered with open_clip under the file's stem)."""
    if model in open_clip.list_models():
        return model
    if model == MINI_MODEL:
        from ..mini.pretrain import register_config

        register_config()
        return model
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"model config {model} not found; give an existing open_clip config JSON or a name "
                            f"such as ViT-B-32")
        open_clip.add_model_config(path)
        return path.stem
    raise UserError(f"unknown open_clip model '{model}'; use ViT-B-32, ViT-B-16 or ViT-L-14 (or any name in "
                    f"open_clip.list_models(), or a path to a model config JSON)")


def weights_kind(pretrained: Optional[str]) -> str:
    """'none' (random init), 'file' (a local checkpoint) or 'tag' (an open_clip pretrained tag)."""
    if pretrained is None or str(pretrained).strip().lower() in _NO_WEIGHTS:
        return "none"
    text = str(pretrained)
    if os.sep in text or "/" in text or Path(text).suffix in {".bin", ".pt", ".pth", ".safetensors"}:
        return "file"
    return "tag"


def use_quick_gelu(name: str, pretrained: Optional[str], quick_gelu: Optional[bool]) -> bool:
    """Explicit choice wins; otherwise the pretrained tag's setting, QuickGELU for the OpenAI
    architectures (OpenAI weights need it), else the model config's own choice."""
    if quick_gelu is not None:
        return bool(quick_gelu)
    if weights_kind(pretrained) == "tag":
        cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
        if "quick_gelu" in cfg:
            return bool(cfg["quick_gelu"])
    if name in OPENAI_ARCHITECTURES:
        return True
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """open_clip's inference preprocessing: resize (shortest side, bicubic), centre crop, RGB, then
    normalise. The geometric part produces uint8 images at model resolution (what the eval caches hold)."""

    size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def _transform(self, train: bool):
        from open_clip.transform import image_transform

        return image_transform(self.size, is_train=train, mean=self.mean, std=self.std,
                               resize_mode=self.resize_mode, interpolation=self.interpolation)

    def geometry(self):
        """PIL image -> uint8 array H x W x 3 (resize, crop, RGB; no normalisation)."""
        from open_clip.transform import MaybeToTensor
        from torchvision.transforms import Compose, Normalize

        steps = self._transform(train=False).transforms
        if not (isinstance(steps[-1], Normalize) and isinstance(steps[-2], MaybeToTensor)):
            raise RuntimeError("unexpected open_clip inference transform; cannot split off normalisation")
        return _ToUint8(Compose(steps[:-2]), self.size)

    def tensor_transform(self, train: bool):
        """PIL image -> normalised float tensor 3 x H x W (open_clip's train or inference transform)."""
        return self._transform(train=train)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 (any device) -> normalised float N x 3 x H x W."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


class _ToUint8:
    def __init__(self, compose, size: int):
        self.compose, self.size = compose, size

    def __call__(self, image) -> np.ndarray:
        out = np.asarray(self.compose(image), dtype=np.uint8)
        if out.shape != (self.size, self.size, 3):
            raise ValueError(f"preprocessed image has shape {out.shape}, expected {(self.size, self.size, 3)}")
        return out


def preprocess_for(name: str, pretrained: Optional[str]) -> Preprocess:
    """The preprocessing open_clip would configure for (model, weights), without building the model."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config = open_clip.get_model_config(name)
    if config is None:
        raise UserError(f"unknown open_clip model '{name}'")
    cfg = merge_preprocess_dict(PreprocessCfg(), config.get("preprocess_cfg", {}))
    if weights_kind(pretrained) == "tag":
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(name, pretrained) or {})
    size = config["vision_cfg"]["image_size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise UserError(f"model {name} has a non-square input {tuple(size)}; vision20 needs square inputs")
        size = size[0]
    return Preprocess(size=int(size), mean=tuple(float(v) for v in cfg["mean"]),
                      std=tuple(float(v) for v in cfg["std"]), interpolation=cfg["interpolation"],
                      resize_mode=cfg["resize_mode"])


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs a failed download as an error before raising (we raise one clear line instead) and
    warns on random init; silence the root logger for the call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def create_clip(name: str, pretrained: Optional[str], quick_gelu: Optional[bool]) -> torch.nn.Module:
    """Build the CLIP model (fp32, CPU, eval mode). Offline without weights -> a UserError naming the fix."""
    name = resolve_model_name(name)
    with _quiet_open_clip():
        return _create_clip(name, pretrained, quick_gelu)


def _create_clip(name: str, pretrained: Optional[str], quick_gelu: Optional[bool]) -> torch.nn.Module:
    kind = weights_kind(pretrained)
    gelu = use_quick_gelu(name, pretrained, quick_gelu)
    if kind == "none":  # random init, reproducible: the same θ0 in every run (and expert-cache hits)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=gelu, device="cpu")
        return model.float().eval()
    if kind == "file":
        path = Path(str(pretrained)).expanduser()
        if not path.is_file():
            raise UserError(f"benchmark.pretrained={pretrained}: no such file; give an open_clip checkpoint of "
                            f"{name} (e.g. open_clip_pytorch_model.bin) or pretrained=openai")
        try:
            model = open_clip.create_model(name, pretrained=str(path), force_quick_gelu=gelu, device="cpu")
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"could not load {path} into open_clip {name}: {_first_line(exc)}") from exc
        return model.float().eval()
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise UserError(f"open_clip has no '{pretrained}' weights for {name}; known: {', '.join(tags) or 'none'} "
                        f"(or give a checkpoint path)")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=gelu, device="cpu")
    except RuntimeError as exc:
        raise UserError(
            f"the {name} '{pretrained}' weights are not in the local cache and could not be downloaded (offline?); "
            f"fetch them once with network access (python -m cl_merge.benchmarks.vision20.prepare --models {name}) "
            f"or pass benchmark.pretrained=/path/to/open_clip_pytorch_model.bin"
        ) from exc
    return model.float().eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
