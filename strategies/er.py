"""Experience replay through Avalanche's ``ReplayPlugin``, on the Avalanche-driven learner.

Buffer: Avalanche's ``ExperienceBalancedBuffer`` (the ReplayPlugin default): ``mem_size`` samples at
most, split evenly over the tasks seen so far, each task's share chosen by reservoir sampling. It is
filled after each task with that task's training data, so while task t trains it holds samples of
tasks < t only (checked at every fit). Each replayed sample keeps its task label and goes through
its own task's frozen head.

Replay weighting μ: the fraction of each minibatch drawn from the buffer (once it is non-empty).
Every step takes ``batch_size`` current-task samples, as C-FT does, plus ``round(batch_size · μ/(1−μ))``
buffer samples; the loss is the minibatch mean, so μ is also the weight of the replay term:
L = (1−μ)·L_current + μ·L_replay (exactly, up to rounding the memory batch). Keeping the current
batch unchanged means ER sees the same current-task data per step as C-FT and only adds replay.

Defaults: ``mem_size = 200`` (Avalanche's ReplayPlugin default; Mammoth's smallest standard buffer),
``μ = 0.5`` (Avalanche's default memory batch = training batch; the equal split of Chaudhry et al.
2019's ER and Mammoth's ER configurations).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch

from cl_merge.learner import FitContext
from cl_merge.registry import register_learner

from .avalanche_learner import (AvalancheLearner, avalanche, decode_json, encode_json, task_stand_in,
                                tensor_dataset)


@register_learner
@dataclasses.dataclass
class ERLearner(AvalancheLearner):
    name = "er"
    description = "AdamW + Avalanche ReplayPlugin (experience-balanced buffer, replay fraction μ)"
    stateful = True

    mem_size: int = 200
    mu: float = 0.5  # fraction of each minibatch replayed from the buffer (= replay loss weight)

    def __post_init__(self):
        super().__post_init__()
        if self.mem_size < 1:
            raise ValueError("mem_size must be >= 1")
        if not 0.0 < self.mu < 1.0:
            raise ValueError("mu must be in (0, 1)")
        self._plugin = None

    @property
    def plugin(self):
        if self._plugin is None:
            av = avalanche()
            self._plugin = av.plugins.ReplayPlugin(
                mem_size=self.mem_size,
                storage_policy=av.storage_policy.ExperienceBalancedBuffer(self.mem_size, adaptive_size=True))
        return self._plugin

    @property
    def policy(self):
        return self.plugin.storage_policy

    def memory_batch_size(self) -> int:
        return max(1, round(self.batch_size * self.mu / (1.0 - self.mu)))

    def plugins(self, ctx: FitContext) -> list:
        plugin = self.plugin
        plugin.batch_size = min(self.batch_size, len(ctx.task.train))
        # Batches are full (drop_last): a memory batch larger than the buffer would yield no memory
        # batch at all, so it is capped at the buffer's size.
        plugin.batch_size_mem = min(self.memory_batch_size(), max(len(self.policy.buffer), 1))
        return [plugin]

    def before_train(self, template, ctx: FitContext) -> None:
        held = set(self.buffer_contents()[2].tolist())
        if held and max(held) >= ctx.step - 1:  # the DESIGN rule: past tasks' data only
            raise RuntimeError(f"replay buffer holds task ids {sorted(held)} while training task {ctx.step - 1}")

    def after_train(self, template, ctx: FitContext) -> None:
        # The policy has just added this task's samples as views of its dataset; hold every group
        # as tensors instead, the same form a resumed run loads, so both replay identically.
        for group in self.policy.buffer_groups.values():
            x, y, t = _materialise(group.buffer)
            group.buffer = tensor_dataset(x, y, t.tolist())

    # ---- buffer access and state --------------------------------------------------------------
    def buffer_contents(self):
        """(inputs, labels, task ids, reservoir weights, group) of every buffered sample."""
        xs, ys, ts, ws, gs = [], [], [], [], []
        for g, group in self.policy.buffer_groups.items():
            x, y, t = _materialise(group.buffer)
            xs.append(x), ys.append(y), ts.append(t)
            ws.append(group._buffer_weights[: len(t)])
            gs.append(torch.full((len(t),), g, dtype=torch.long))
        if not xs:
            empty = torch.zeros(0, dtype=torch.long)
            return torch.zeros(0), empty, empty, torch.zeros(0), empty
        return torch.cat(xs), torch.cat(ys), torch.cat(ts), torch.cat(ws), torch.cat(gs)

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {
            "experiences": torch.tensor([self._experiences]),
            "tasks": encode_json({str(i): [t.name, list(t.classnames), list(t.templates)]
                                  for i, t in self._tasks.items()}),
            "buffer/num_exps": torch.tensor([self.policy._num_exps]),
        }
        x, y, t, w, g = self.buffer_contents()
        if len(t):
            state.update({"buffer/x": x.contiguous(), "buffer/y": y, "buffer/task": t,
                          "buffer/weight": w.contiguous(), "buffer/group": g})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        self._experiences = int(state["experiences"])
        self._tasks = {int(i): task_stand_in(*meta) for i, meta in decode_json(state["tasks"]).items()}
        policy = self.policy
        policy._num_exps = int(state["buffer/num_exps"])
        policy.buffer_groups = {}
        lengths = policy.get_group_lengths(policy._num_exps) if policy._num_exps else []
        for g, size in enumerate(lengths):
            group = ReservoirSamplingBuffer(size)
            if "buffer/group" in state:
                mask = state["buffer/group"] == g
                if mask.any():
                    group.buffer = tensor_dataset(state["buffer/x"][mask], state["buffer/y"][mask],
                                                  state["buffer/task"][mask].tolist())
                    group._buffer_weights = state["buffer/weight"][mask]
            policy.buffer_groups[g] = group


def _materialise(dataset):
    """An Avalanche dataset of (x, y, task id) samples as three tensors, in order."""
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0), empty, empty
    x = torch.stack([torch.as_tensor(it[0]) for it in items])
    y = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    t = torch.tensor([int(it[-1]) for it in items], dtype=torch.long)
    return x, y, t
