"""The old name of ``strategies.expert_files`` (the ``checkpoint`` learner: experts from files); importing
it registers the learner."""

from .expert_files import CheckpointLearner  # noqa: F401
