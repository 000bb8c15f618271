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

Causal LMs (adapters without classifier logits): Avalanche's template cannot carry the answer-token
loss, so replay runs natively (``fit_native``) with the same definitions: an experience-balanced
buffer (``mem_size // tasks`` per task, the remainder to the first tasks, each task's share its
records with the largest uniform reservoir weights, drawn once per task from the fit's seed), and
every step's ``batch_size`` current records plus ``round(batch_size·μ/(1−μ))`` buffered records
(at most the buffer's size), drawn without replacement through reshuffled passes over the buffer.
The loss is the adapter's mean over the answer tokens of the mixed batch (token-weighted, where the
classifier path is sample-weighted). Buffered records are text; the state stores them as JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import torch

from cl_merge.learner import FitContext, GradientLearner
from cl_merge.params import StateDict
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
        # native path (causal LMs): one group per past task, each a list of (weight, task id, record)
        # sorted by decreasing reservoir weight
        self._native = False
        self._groups: List[List[Tuple[float, int, Dict[str, str]]]] = []

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
        if held and max(held) >= ctx.step - 1:  # docs/protocol.md: past tasks' data only
            raise RuntimeError(f"replay buffer holds task ids {sorted(held)} while training task {ctx.step - 1}")

    def after_train(self, template, ctx: FitContext) -> None:
        # The policy has just added this task's samples as views of its dataset; hold every group
        # as tensors instead, the same form a resumed run loads, so both replay identically.
        for group in self.policy.buffer_groups.values():
            x, y, t = _materialise(group.buffer)
            group.buffer = tensor_dataset(x, y, t.tolist())

    # ---- native path (causal LMs) -------------------------------------------------------------
    def native_buffer(self) -> List[Tuple[int, Dict[str, str]]]:
        """(task id, record) of every buffered record."""
        return [(t, r) for group in self._groups for _, t, r in group]

    def fit_native(self, start: StateDict, ctx: FitContext) -> StateDict:
        self._native = True
        held = {t for t, _ in self.native_buffer()}
        if held and max(held) >= ctx.step - 1:  # docs/protocol.md: past tasks' data only
            raise RuntimeError(f"replay buffer holds task ids {sorted(held)} while training task {ctx.step - 1}")
        memory = [r for _, r in self.native_buffer()]
        adapter = ctx.adapter
        ctx.adapter = _ReplayBatches(adapter, memory, min(self.memory_batch_size(), len(memory)), ctx.seed + 2)
        try:
            expert = GradientLearner.fit(self, start, ctx)
        finally:
            ctx.adapter = adapter
        # add this task's records: reservoir weights from the fit's seed, then rebalance the groups
        data = ctx.task.train
        g = torch.Generator().manual_seed(ctx.seed + 1)
        weights = torch.rand(len(data), generator=g).tolist()
        group = sorted(((w, ctx.step - 1, data[i]) for i, w in enumerate(weights)), key=lambda x: -x[0])
        self._groups.append(group)
        n = len(self._groups)
        sizes = [self.mem_size // n + (1 if i < self.mem_size % n else 0) for i in range(n)]
        self._groups = [grp[:size] for grp, size in zip(self._groups, sizes)]
        self._experiences += 1
        return expert

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
        if self._native:
            return {**self._counter_state(),
                    "native/buffer": encode_json([[[w, t, r] for w, t, r in grp] for grp in self._groups])}
        state: Dict[str, Any] = {
            **self._counter_state(),
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
        if self._load_counters(state):
            self._groups = [[(float(w), int(t), dict(r)) for w, t, r in grp]
                            for grp in decode_json(state["native/buffer"])]
            return
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

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


class _ReplayBatches:
    """The adapter, with every training batch (a list of records) extended by buffered records."""

    def __init__(self, adapter, memory: List[Dict[str, str]], memory_batch: int, seed: int):
        self._adapter, self._memory, self._k = adapter, memory, memory_batch
        # its own generator: the current task's batches stay exactly C-FT's
        self._generator = torch.Generator().manual_seed(seed)

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def train_batches(self, task, batch_size, steps, generator):
        order: List[int] = []
        for batch in self._adapter.train_batches(task, batch_size, steps, generator):
            if self._memory and self._k > 0:
                if len(order) < self._k:
                    order = torch.randperm(len(self._memory), generator=self._generator).tolist()
                picked, order = order[: self._k], order[self._k:]
                batch = list(batch) + [self._memory[i] for i in picked]
            yield batch
