"""Model adapters: what the protocol, learners and mergers need from a model, and nothing more."""

from .base import ModelAdapter

__all__ = ["ModelAdapter"]
