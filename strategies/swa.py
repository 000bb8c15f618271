"""Stochastic weight averaging over experts: deployed_t = ((t−1)·previous + expert) / t."""

from __future__ import annotations

import dataclasses

from cl_merge.merger import Merger
from cl_merge.registry import register_merger


@register_merger
@dataclasses.dataclass
class SWAMerger(Merger):
    name = "swa"
    protocols = ("sequential", "independent", "multitask")  # the last step is the all-at-once merge
    description = "running average of the experts"

    def merge_tensor(self, x):
        return ((x.step - 1) * x.previous + x.expert) / x.step
