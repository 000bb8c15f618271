"""The old name of ``cl_merge.step_checkpoint`` (a run's per-step checkpoints), kept for imports."""

from .step_checkpoint import FORMAT, Checkpointer, load_optional  # noqa: F401
