"""Convert FusionBench's fine-tuned Hugging Face CLIP vision encoders into open_clip image-tower
weights, one safetensors file per task, usable as independent-protocol experts::

    python -m cl_merge.benchmarks.vision20.convert_hf_clip --model ViT-B-32 --out experts/ViT-B-32

reads ``tanganke/clip-vit-base-patch32_<task>`` (``-base-patch16_`` for ViT-B-16,
``-large-patch14_`` for ViT-L-14; ``--source`` takes another repo or folder template) and writes
``experts/ViT-B-32/<task>.safetensors`` (keys = open_clip ``model.visual`` parameter names) plus a
``manifest.json``. FusionBench fine-tuned only ``CLIPVisionModel`` (no projection), so the visual
projection comes from the pre-trained open_clip model (``--pretrained``, default ``openai``).

Mapping (HF -> open_clip ``visual.``): ``embeddings.class_embedding`` -> ``class_embedding``;
``embeddings.position_embedding.weight`` -> ``positional_embedding``; ``embeddings.patch_embedding``
-> ``conv1``; ``pre_layrnorm`` -> ``ln_pre``; per layer ``self_attn.{q,k,v}_proj`` -> ``attn.in_proj_*``
(concatenated q, k, v), ``self_attn.out_proj`` -> ``attn.out_proj``, ``layer_norm1/2`` -> ``ln_1/2``,
``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``; ``post_layernorm`` -> ``ln_post``; ``visual_projection.weight``
(transposed) -> ``proj``. OpenAI CLIP uses QuickGELU in both libraries (HF ``hidden_act="quick_gelu"``,
open_clip ``quick_gelu=True``).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from cl_merge.errors import UserError

StateDict = Dict[str, torch.Tensor]

SOURCES = {
    "ViT-B-32": "tanganke/clip-vit-base-patch32_{fusionbench}",
    "ViT-B-16": "tanganke/clip-vit-base-patch16_{fusionbench}",
    "ViT-L-14": "tanganke/clip-vit-large-patch14_{fusionbench}",
}
_ANCHOR = "embeddings.class_embedding"
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def _split_prefix(state: Mapping[str, torch.Tensor]) -> str:
    anchors = [k for k in state if k.endswith(_ANCHOR)]
    if len(anchors) != 1:
        raise UserError("not a Hugging Face CLIP vision checkpoint: expected one '*embeddings.class_embedding' "
                        f"key, found {len(anchors)}")
    return anchors[0][: -len(_ANCHOR)]


def hf_to_open_clip_visual(hf_state: Mapping[str, torch.Tensor],
                           reference: Optional[Mapping[str, torch.Tensor]] = None) -> StateDict:
    """open_clip ``visual`` state from a HF ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` /
    ``CLIPModel`` state dict. ``reference`` (an open_clip visual state) supplies ``proj`` when the
    checkpoint has no ``visual_projection`` and is used to check every name and shape."""
    prefix = _split_prefix(hf_state)
    v = {k[len(prefix):]: t for k, t in hf_state.items() if k.startswith(prefix)}
    used = set()

    def take(key: str) -> torch.Tensor:
        if key not in v:
            raise UserError(f"HF CLIP checkpoint lacks '{prefix}{key}'")
        used.add(key)
        return v[key]

    pre = "pre_layrnorm" if "pre_layrnorm.weight" in v else "pre_layernorm"
    out: StateDict = {
        "class_embedding": take("embeddings.class_embedding"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
        "conv1.weight": take("embeddings.patch_embedding.weight"),
        "ln_pre.weight": take(f"{pre}.weight"),
        "ln_pre.bias": take(f"{pre}.bias"),
        "ln_post.weight": take("post_layernorm.weight"),
        "ln_post.bias": take("post_layernorm.bias"),
    }
    layers = sorted({int(m.group(1)) for k in v for m in [_LAYER.match(k)] if m})
    if layers != list(range(len(layers))):
        raise UserError(f"HF CLIP checkpoint has non-contiguous encoder layers {layers}")
    for i in layers:
        s, d = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        attn = s + "self_attn."
        out[d + "attn.in_proj_weight"] = torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"], dim=0)
        out[d + "attn.in_proj_bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"], dim=0)
        for part in ("weight", "bias"):
            out[d + f"attn.out_proj.{part}"] = take(attn + f"out_proj.{part}")
            out[d + f"ln_1.{part}"] = take(s + f"layer_norm1.{part}")
            out[d + f"ln_2.{part}"] = take(s + f"layer_norm2.{part}")
            out[d + f"mlp.c_fc.{part}"] = take(s + f"mlp.fc1.{part}")
            out[d + f"mlp.c_proj.{part}"] = take(s + f"mlp.fc2.{part}")
    leftover = sorted(k for k in v if k not in used and not k.endswith("position_ids"))
    if leftover:
        raise UserError(f"HF CLIP checkpoint has weights the conversion does not map: {', '.join(leftover[:5])}")

    projection = [k for k in hf_state if k.endswith("visual_projection.weight")]
    if projection:
        out["proj"] = hf_state[projection[0]].t()
    elif reference is not None and "proj" in reference:
        out["proj"] = reference["proj"]
    else:
        raise UserError("the HF checkpoint has no visual_projection; give the pre-trained open_clip model as "
                        "reference (its projection was not fine-tuned)")
    out = {k: t.detach().to(torch.float32).contiguous().clone() for k, t in out.items()}
    if reference is not None:
        check_against(out, reference, "converted checkpoint")
    return out


def check_against(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise UserError(f"{what} does not match the open_clip image tower: missing {missing[:4]}, "
                        f"unexpected {extra[:4]}")
    for key, ref in reference.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise UserError(f"{what}: '{key}' has shape {tuple(state[key].shape)}, the model expects "
                            f"{tuple(ref.shape)} (a different architecture?)")


# ---- reading HF checkpoints ---------------------------------------------------------------------
def read_hf_state(location: str) -> StateDict:
    """State dict of a HF checkpoint: a local folder (model*.safetensors or pytorch_model*.bin) or a
    hub repo id (downloaded; needs network unless cached)."""
    folder = Path(location).expanduser()
    if not folder.is_dir():
        folder = _download(location)
    shards = sorted(folder.glob("model*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        state: StateDict = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for b in bins:
            state.update(torch.load(str(b), map_location="cpu", weights_only=True))
        return state
    raise UserError(f"no model*.safetensors or pytorch_model*.bin in {folder}")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.bin", "*.json"]))
    except Exception as exc:
        raise UserError(f"cannot fetch {repo_id} ({type(exc).__name__}); run with network access once, or "
                        f"download it and pass --source with a local folder template") from exc


# ---- the command ---------------------------------------------------------------------------------
def convert_tasks(model: str, out: Path, tasks: Iterable[str], source: str, pretrained: Optional[str],
                  quick_gelu: Optional[bool] = None) -> Dict[str, dict]:
    from cl_merge.io import save_tensors_atomic, write_json_atomic

    from .model import create_clip, resolve_model_name
    from .specs import spec_by_name

    name = resolve_model_name(model)
    base = create_clip(name, pretrained, quick_gelu)
    reference = {k: p.detach() for k, p in base.visual.named_parameters()}
    out = Path(out)
    manifest: Dict[str, dict] = {}
    for task in tasks:
        spec = spec_by_name(task)
        location = source.format(fusionbench=spec.fusionbench, task=spec.name)
        state = hf_to_open_clip_visual(read_hf_state(location), reference)
        path = out / f"{spec.name}.safetensors"
        save_tensors_atomic(path, state)
        delta = torch.sqrt(sum(((state[k] - reference[k].float()) ** 2).sum() for k in reference))
        norm = torch.sqrt(sum((reference[k].float() ** 2).sum() for k in reference))
        manifest[spec.name] = {"source": location, "file": path.name,
                               "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                               "relative_distance_from_pretrained": float(delta / norm)}
        print(f"{spec.name}: {location} -> {path} (|expert - θ0| / |θ0| = {float(delta / norm):.4f})")
    write_json_atomic(out / "manifest.json", {"model": name, "pretrained": pretrained, "experts": manifest})
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    from .specs import task_specs

    p = argparse.ArgumentParser(description="convert FusionBench HF-CLIP experts into open_clip image-tower weights")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (ViT-B-32, ViT-B-16, ViT-L-14)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", nargs="*", help="vision20 task names (default: all 20)")
    p.add_argument("--source", help="repo id or folder template with {fusionbench} or {task} "
                                    "(default: FusionBench's repos for --model)")
    p.add_argument("--pretrained", default="openai", help="θ0 weights (open_clip tag or checkpoint path)")
    args = p.parse_args(argv)
    source = args.source or SOURCES.get(args.model)
    if source is None:
        raise UserError(f"no default FusionBench source for {args.model}; pass --source")
    tasks = args.tasks or [s.name for s in task_specs()]
    convert_tasks(args.model, args.out, tasks, source, args.pretrained)
    return 0


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
