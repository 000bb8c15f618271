"""Experts from files instead of training: ``DIR/<task name>.safetensors`` per task (e.g. FusionBench's
fine-tuned CLIP experts converted by ``python -m cl_merge.benchmarks.vision20.convert_hf_clip``).
With the independent protocol this is pure continual merging of published experts."""

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
    description = "load each task's expert from learner.path=DIR/<task>.safetensors (no training)"
    cacheable = False  # the files are the cache
    expert_source = "checkpoint"

    path: str = ""

    def fit(self, start, ctx: FitContext):
        if not self.path:
            raise UserError("the checkpoint learner needs learner.path=DIR holding <task>.safetensors files")
        from cl_merge.benchmarks.vision20.experts import load_expert  # checks names and shapes against θ0

        return load_expert(Path(self.path), ctx.task.name, start)
