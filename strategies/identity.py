"""No merging: the expert is deployed as it is (C-FT, EWC, ER)."""

from __future__ import annotations

import dataclasses

from cl_merge.merger import Merger
from cl_merge.registry import register_merger


@register_merger
@dataclasses.dataclass
class IdentityMerger(Merger):
    name = "identity"
    description = "deploy the expert unchanged"

    def merge_tensor(self, x):
        return x.expert.detach().clone()
