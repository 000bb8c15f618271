"""The named strategies: (learner, merger, default protocol, hyperparameters), paper defaults."""

from cl_merge.registry import register_strategy

register_strategy("c-ft", "adam", "identity", "sequential",
                  description="continual fine-tuning: sequential Adam, no merging (lower bound)")
register_strategy("c-ta", "adam", "task_arithmetic", "independent", {"merger.alpha": 0.3},
                  description="continual task arithmetic, α = 0.3")
register_strategy("swa", "adam", "swa", "independent",
                  description="running average of independently fine-tuned experts")
