"""Experts from files instead of training. With the independent protocol this is pure continual
merging of published experts.

* vision20: ``learner.path=DIR`` holding ``DIR/<task name>.safetensors`` per task (e.g. FusionBench's
  fine-tuned CLIP experts converted by ``python -m cl_merge.benchmarks.vision20.convert_hf_clip``).
* language models (MergeBench): a task that names its expert checkpoint in
  ``task.metadata["expert_checkpoint"]`` (a hub id such as ``MergeBench/Llama-3.2-3B_math`` or a local
  folder) loads from there; ``learner.path=DIR`` overrides it with ``DIR/<task name>`` (a
  ``save_pretrained`` folder) or ``DIR/<task name>.safetensors`` when that exists. ``open_expert``
  gives the expert as a lazy, tensor-by-tensor source (the on-disk parameter store reads it the same
  way); ``fit`` loads the mergeable tensors into memory (the in-memory store, small models)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cl_merge.errors import UserError
from cl_merge.learner import FitContext, Learner
from cl_merge.registry import register_learner


@register_learner
@dataclasses.dataclass
class CheckpointLearner(Learner):
    name = "checkpoint"
    description = ("load each task's expert from files (no training): learner.path=DIR/<task>.safetensors, "
                   "or the task's own checkpoint (MergeBench/{base}_{domain}, a local folder)")
    cacheable = False  # the files are the cache
    expert_source = "checkpoint"
    opens_experts = True

    path: str = ""

    # ---- language-model checkpoints ------------------------------------------------------------
    def expert_path(self, task) -> Path:
        """The local folder/file of ``task``'s expert (hub ids resolve through the HF cache)."""
        if self.path:
            root = Path(self.path).expanduser()
            for candidate in (root / task.name, root / f"{task.name}.safetensors"):
                if candidate.exists():
                    return candidate
        ref = task.metadata.get("expert_checkpoint")
        if not ref:
            where = f"{Path(self.path) / task.name} does not exist" if self.path else "learner.path is not set"
            raise UserError(f"no expert checkpoint for task {task.name}: {where}")
        from cl_merge.benchmarks.mergebench.model_sources import resolve

        return resolve(str(ref), f"expert of {task.name}")

    def open_expert(self, task, names, **kwargs):
        from cl_merge.streaming import TensorSource

        path = self.expert_path(task)
        return TensorSource(path, names=names, label=f"expert {task.name} ({path})", **kwargs)

    def fit(self, start, ctx: FitContext):
        if "expert_checkpoint" in ctx.task.metadata:
            source = self.open_expert(ctx.task, list(start))
            return {k: source[k].to(dtype=ref.dtype, device=ref.device) for k, ref in start.items()}
        if not self.path:
            raise UserError("the checkpoint learner needs learner.path=DIR holding <task>.safetensors files")
        from cl_merge.benchmarks.vision20.experts import load_expert  # checks names and shapes against θ0

        return load_expert(Path(self.path), ctx.task.name, start)
