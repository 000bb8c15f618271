"""The old name of ``benchmarks.mergebench.model_sources`` (MergeBench's bases and experts), kept for
imports."""

from .model_sources import BASES, EXPERT_TEMPLATE, is_local, parse_pairs, resolve  # noqa: F401
