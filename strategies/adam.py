"""Plain fine-tuning: AdamW (decoupled weight decay 0.01) with a cosine schedule, as in the SAIM
paper's setup (Adam, cosine learning-rate schedule, weight decay 0.01)."""

from __future__ import annotations

import dataclasses

from cl_merge.learner import GradientLearner
from cl_merge.registry import register_learner


@register_learner
@dataclasses.dataclass
class AdamLearner(GradientLearner):
    name = "adam"
    description = "AdamW fine-tuning, cosine schedule (the C-FT / C-TA expert trainer)"
