"""The Avalanche-driven learners on a tiny randomly initialised CLIP and generated tasks (fast; no
pre-trained weights needed): the Avalanche path reproduces `adam`, replayed samples use their own
task's head, ER's buffer obeys its rules, and the learners' state survives a checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cl_merge.io import load_tensors, save_tensors_atomic
from cl_merge.learner import FitContext
from cl_merge.models.clip import ClipClassifier
from cl_merge.task import Task

from cl_merge.strategies.adam import AdamLearner
from cl_merge.strategies.avalanche_learner import AvalancheLearner, _classes
from cl_merge.strategies.er import ERLearner
from cl_merge.strategies.ewc import EWCLearner

BUDGET = dict(steps=4, batch_size=8, lr=1e-3)


def make_task(name, classnames, seed, n=40):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g),
                         torch.randint(0, len(classnames), (n,), generator=g))
    return Task(name=name, classnames=tuple(classnames), templates=("a {} thing.",), train=data, val=data,
                test=data, fingerprint=name)



@pytest.fixture(scope="module")
def world():
    from cl_merge.benchmarks.mini.pretrain import create_model, load_tokenizer

    torch.manual_seed(0)
    adapter = ClipClassifier(create_model(), load_tokenizer(), model_id="random-mini")
    # different head widths, so replayed minibatches mix tasks with 3, 2 and 4 classes
    tasks = [make_task("a", ["red", "green", "blue"], 1), make_task("b", ["cat", "dog"], 2),
             make_task("c", ["one", "two", "three", "four"], 3)]
    for task in tasks:
        adapter.prepare(task)
    return adapter, tasks, adapter.get_state()


def run_stream(learner, adapter, tasks, start, first_step=1):
    states = []
    for step, task in enumerate(tasks, start=first_step):
        start = learner.fit(start, FitContext(adapter=adapter, task=task, step=step, seed=100 + step))
        states.append((dict(start), learner.state_dict()))
    return states


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_avalanche_path_without_plugins_reproduces_adam_exactly(world):
    adapter, tasks, theta0 = world
    ctx = dict(adapter=adapter, task=tasks[0], step=1, seed=7)
    plain = AdamLearner(**BUDGET).fit(dict(theta0), FitContext(**ctx))
    through_avalanche = AvalancheLearner(**BUDGET).fit(dict(theta0), FitContext(**ctx))
    assert max_diff(plain, theta0) > 0
    assert max_diff(plain, through_avalanche) == 0.0  # same batches, optimizer, schedule, loss


def test_mixed_task_minibatch_goes_through_each_samples_own_head(world):
    adapter, tasks, _ = world
    TaskHeadsModel, _, _ = _classes()
    model = TaskHeadsModel(adapter, dict(enumerate(tasks)))
    assert [n for n, _ in model.named_parameters()] == list(adapter.trainable_parameters())
    x = torch.cat([tasks[0].train.tensors[0][:3], tasks[1].train.tensors[0][:2]])
    y = torch.cat([tasks[0].train.tensors[1][:3], tasks[1].train.tensors[1][:2]])
    t = torch.tensor([0, 0, 0, 1, 1])
    with torch.no_grad():
        out = model(x, t)
        own0, own1 = adapter.logits(x[:3], tasks[0]), adapter.logits(x[3:], tasks[1])
    assert out.shape == (5, 3)
    torch.testing.assert_close(out[:3], own0)
    torch.testing.assert_close(out[3:, :2], own1)
    assert torch.isneginf(out[3:, 2]).all()  # a class task 1 does not have: probability 0
    mixed = F.cross_entropy(out, y)
    own = (F.cross_entropy(own0, y[:3], reduction="sum") + F.cross_entropy(own1, y[3:], reduction="sum")) / 5
    torch.testing.assert_close(mixed, own)


def test_er_buffer_is_bounded_and_holds_only_past_tasks_training_data(world, monkeypatch):
    adapter, tasks, theta0 = world
    from avalanche.training.plugins import ReplayPlugin

    seen = []  # (task being trained, task ids in the buffer, memory batch) at each training start
    original = ReplayPlugin.before_training_exp

    def spy(self, strategy, **kwargs):
        buffer = self.storage_policy.buffer
        held = sorted({int(buffer[i][-1]) for i in range(len(buffer))})
        seen.append((strategy.experience.current_experience, held, self.batch_size_mem))
        return original(self, strategy, **kwargs)

    monkeypatch.setattr(ReplayPlugin, "before_training_exp", spy)
    learner = ERLearner(**BUDGET, mem_size=25, mu=0.5)
    sizes = []
    for step, task in enumerate(tasks, start=1):
        learner.fit(dict(theta0), FitContext(adapter=adapter, task=task, step=step, seed=step))
        x, y, t, _, _ = learner.buffer_contents()
        sizes.append(len(t))
        assert len(t) <= 25 and set(t.tolist()) == set(range(step))
        for xi, yi, ti in zip(x, y, t):  # every sample is a training sample of its own task
            images, labels = tasks[int(ti)].train.tensors
            match = (images == xi).flatten(1).all(1)
            assert match.any() and labels[match][0] == yi
    assert sizes == [25, 25, 25]
    assert [(exp, held) for exp, held, _ in seen] == [(0, []), (1, [0]), (2, [0, 1])]
    assert seen[1][2] == 8  # μ = 0.5: as many replayed samples as current ones


def test_er_refuses_a_buffer_holding_the_current_task(world):
    adapter, tasks, theta0 = world
    learner = ERLearner(**BUDGET, mem_size=10)
    learner.fit(dict(theta0), FitContext(adapter=adapter, task=tasks[0], step=1, seed=1))
    with pytest.raises(RuntimeError, match="past tasks|task ids"):  # step 1 again: task 0 is current
        learner.fit(dict(theta0), FitContext(adapter=adapter, task=tasks[0], step=1, seed=1))


@pytest.mark.parametrize("make", [lambda: EWCLearner(**BUDGET),
                                  lambda: EWCLearner(**BUDGET, mode="online", decay_factor=0.5),
                                  lambda: ERLearner(**BUDGET, mem_size=12)],
                         ids=["ewc-separate", "ewc-online", "er"])
def test_state_through_a_checkpoint_resumes_to_the_same_experts(world, tmp_path, make):
    adapter, tasks, theta0 = world
    full = run_stream(make(), adapter, tasks, dict(theta0))
    again = run_stream(make(), adapter, tasks, dict(theta0))
    assert all(max_diff(a[0], b[0]) == 0.0 for a, b in zip(full, again))  # deterministic
    state = full[0][1]
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    path = tmp_path / "learner.safetensors"
    save_tensors_atomic(path, state)  # what the protocol's checkpoint does with it
    resumed_learner = make()
    resumed_learner.load_state_dict(load_tensors(path))
    resumed = run_stream(resumed_learner, adapter, tasks[1:], dict(full[0][0]), first_step=2)
    assert max_diff(resumed[-1][0], full[-1][0]) == 0.0
    assert resumed[-1][1].keys() == full[-1][1].keys()


def test_ewc_keeps_one_penalty_per_past_task_or_one_online(world):
    adapter, tasks, theta0 = world
    separate = EWCLearner(**BUDGET)
    online = EWCLearner(**BUDGET, mode="online", decay_factor=0.5)
    run_stream(separate, adapter, tasks, dict(theta0))
    run_stream(online, adapter, tasks, dict(theta0))
    assert sorted(separate.plugin.importances) == [0, 1, 2]
    assert sorted(online.plugin.importances) == [2]
    names = set(adapter.trainable_parameters())
    assert set(separate.plugin.saved_params[1]) == names


def test_ewc_penalty_pulls_towards_the_previous_task(world):
    adapter, tasks, theta0 = world
    weak, strong = EWCLearner(**BUDGET, ewc_lambda=0.0), EWCLearner(**BUDGET, ewc_lambda=1e9)
    drift = []
    for learner in (weak, strong):
        first = learner.fit(dict(theta0), FitContext(adapter=adapter, task=tasks[0], step=1, seed=1))
        second = learner.fit(dict(first), FitContext(adapter=adapter, task=tasks[1], step=2, seed=2))
        drift.append(sum((second[k] - first[k]).norm() ** 2 for k in first) ** 0.5)
    assert drift[1] < 0.5 * drift[0]


@pytest.mark.parametrize("cls, bad", [(EWCLearner, {"ewc_lambda": -1.0}), (EWCLearner, {"decay_factor": 2.0}),
                                      (ERLearner, {"mu": 1.0}), (ERLearner, {"mem_size": 0})])
def test_bad_hyperparameters_are_rejected_as_user_errors(cls, bad):
    from cl_merge.errors import UserError

    with pytest.raises(UserError):
        cls.build(bad)
