"""Driving a merger over a stream of synthetic experts: shared by the mergers' oracle tests (the
oracles themselves stay in each test file)."""

import torch

SHAPES = (("w", (6, 4)), ("b", (6,)), ("conv", (3, 2, 2, 2)))


def random_state(seed, shapes=SHAPES, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in shapes}


def run_merger(merger, base, experts, starts):
    """Deployed weights after each step, the previous deployment fed back as the protocol does."""
    merger.reset(base)
    deployed = {k: v.clone() for k, v in base.items()}
    history = []
    for t, (expert, start) in enumerate(zip(experts, starts), start=1):
        deployed = merger.merge(base=base, previous=deployed, expert=expert, start=start, step=t)
        history.append(deployed)
    return history
