"""Random ViT-B/32 image-tower weights and synthetic task vectors, shared by the merge-step
benchmarks (imported as a sibling module: these scripts run as ``python benchmarks/perf/X.py``)."""

import math

import torch


def vit_b32_tower() -> dict:
    """open_clip's ViT-B/32 image tower with random weights (``pretrained=None``), as name → tensor."""
    import open_clip

    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    return {k: p.detach().clone() for k, p in visual.named_parameters()}


def task_vector(base: dict, kind: str, gen: torch.Generator, scale: float = 1e-3) -> dict:
    """``gaussian``: i.i.d. noise. ``finetune``: on 2-D tensors a few strong directions with a decaying
    spectrum on top of small noise, the shape of real fine-tuning updates."""
    tv = {}
    for k, v in base.items():
        noise = torch.randn(v.shape, generator=gen) * scale
        if kind == "finetune" and v.ndim == 2:
            r = 8
            left = torch.randn(v.shape[0], r, generator=gen)
            right = torch.randn(r, v.shape[1], generator=gen)
            decay = torch.logspace(0, -2, r)
            noise = noise * 0.05 + (left * decay) @ right * scale / math.sqrt(v.shape[1])
        tv[k] = noise
    return tv
