"""Fine-tuning driven by Avalanche's ``SupervisedTemplate`` (avalanche-lib 0.6.0), the base of the
``ewc`` and ``er`` learners.

The template trains our adapter's model with exactly the settings of ``GradientLearner`` (the ``adam``
learner): AdamW(lr, weight_decay) over the adapter's trainable parameters, the same per-iteration
cosine schedule (Avalanche's ``LRSchedulerPlugin`` stepping our LambdaLR), ``steps`` iterations of
``batch_size`` samples drawn by the same seeded generator, ``torch.manual_seed(ctx.seed)``. With no
plugin, this learner (registered as ``avalanche``) reproduces ``adam`` step for step; ``ewc`` and
``er`` only add Avalanche's ``EWCPlugin`` / ``ReplayPlugin``. Evaluation stays with the protocol:
the template runs with an empty ``EvaluationPlugin`` and no periodic evaluation.

How our pieces map onto Avalanche's:

* model: a ``MultiTaskModule`` whose parameters are the adapter's trainable parameters (same names,
  same order) and whose ``forward_single_task(x, t)`` is ``adapter.logits(x, task t)``: the frozen
  head of task t. Task ids are stream positions, 0-based.
* data: each task's training set wrapped as an ``AvalancheDataset`` whose samples carry their task
  label, presented as one ``DatasetExperience`` per ``fit``.
* iterations: the template trains by epochs; a plugin stops it after ``steps`` iterations.

Adapters without ``logits`` (the Hugging Face causal-LM adapter): the template's
``criterion(model(x), y)`` cannot carry a loss on answer tokens of variable-length text batches, so
these learners run natively there (``fit_native``): ``GradientLearner``'s loop with the same
optimizer, schedule, steps and batches, and EWC's penalty / ER's replay implemented with the same
definitions as Avalanche's plugins (see ``ewc.py`` and ``er.py``).

Avalanche is imported lazily (it takes seconds), so listing or running other strategies stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from typing import Any, Dict, List

import torch

from cl_merge.divergence import check_iteration
from cl_merge.learner import FitContext, GradientLearner
from cl_merge.params import StateDict
from cl_merge.registry import register_learner
from cl_merge.task import Task


@functools.lru_cache(maxsize=1)
def avalanche():
    """Import Avalanche once, with the torchvision shim in place (``import cl_merge`` installs it)."""
    import cl_merge  # noqa: F401  (shim before avalanche imports torchvision)

    with warnings.catch_warnings():
        # avalanche's GEM imports qpsolvers, which warns that no QP solver is installed: not used here
        warnings.simplefilter("ignore")
        import avalanche.benchmarks as benchmarks
        import avalanche.benchmarks.utils as utils
        import avalanche.models as models
        import avalanche.training.plugins as plugins
        import avalanche.training.storage_policy as storage_policy
        import avalanche.training.templates as templates
    import types

    return types.SimpleNamespace(benchmarks=benchmarks, utils=utils, models=models, plugins=plugins,
                                 storage_policy=storage_policy, templates=templates)


# ---- Avalanche-side classes (built on first use, since their bases live in avalanche) ------------

@functools.lru_cache(maxsize=1)
def _classes():
    av = avalanche()

    class TaskHeadsModel(av.models.MultiTaskModule):
        """The adapter's trainable tower + the frozen head of each task, as a task-aware module.

        It registers no submodule: ``named_parameters`` returns the adapter's trainable parameters, so
        the optimizer, EWC's importances and the adapter's state all use the same names.
        """

        def __init__(self, adapter, tasks: Dict[int, Task]):
            super().__init__()
            self.adapter = adapter
            self.tasks = tasks  # task id -> Task (or a stand-in holding what its head needs)

        def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
            for name, p in self.adapter.trainable_parameters().items():
                yield prefix + name, p

        def train(self, mode: bool = True):
            # The harness fine-tunes with the model in the mode the adapter set (eval, like the
            # `adam` learner); the template's model.train()/eval() calls must not change it.
            self.training = mode
            return self

        def adaptation(self, experience):
            # Heads are the adapter's, built once per task and frozen: nothing to grow.
            return None

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.adapter.logits(x, self.tasks[int(task_label)])

        def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor:
            if isinstance(task_labels, int):
                return self.forward_single_task(x, task_labels)
            unique = torch.unique(task_labels).tolist()
            if len(unique) == 1:  # one task: its own logits, exactly as `adam` computes them
                return self.forward_single_task(x, unique[0])
            # Mixed tasks (replay): each sample through its own task's head. Heads differ in width;
            # Avalanche pads the narrower ones with 0, which at CLIP's logit scale would act as real
            # competing classes in the cross-entropy. Pad with -inf: absent classes get probability 0.
            labels = task_labels.to(x.device)
            outs = {t: (labels == t, self.forward_single_task(x[labels == t], t)) for t in unique}
            width = max(o.shape[1] for _, o in outs.values())
            first = next(iter(outs.values()))[1]
            out = first.new_full((x.shape[0], width), float("-inf"))
            for mask, o in outs.values():
                out[mask, : o.shape[1]] = o
            return out

    class Template(av.templates.SupervisedTemplate):
        """SupervisedTemplate whose current-task loader draws the batches `adam` draws: shuffled with
        the fit's generator, full batches only (Avalanche's default loader uses the global RNG and
        keeps a short last batch). Plugins (e.g. ReplayPlugin) may still replace it."""

        def __init__(self, *, generator: torch.Generator, **kwargs):
            super().__init__(**kwargs)
            self._generator = generator

        def make_train_dataloader(self, num_workers=0, **kwargs):
            data = self.adapted_dataset
            self.dataloader = torch.utils.data.DataLoader(
                data, batch_size=min(self.train_mb_size, len(data)), shuffle=True, drop_last=True,
                generator=self._generator, collate_fn=data.collate_fn, num_workers=num_workers)

    class Budget(av.plugins.SupervisedPlugin):
        """Stops training after ``steps`` iterations (the template counts epochs) and reports progress."""

        def __init__(self, steps: int, ctx: FitContext):
            super().__init__()
            self.steps, self.ctx, self.done = steps, ctx, 0

        def after_training_iteration(self, strategy, **kwargs):
            self.ctx.iteration = self.done
            check_iteration(self.ctx, strategy.loss)  # non-finite loss or gradient norm: the run diverged
            self.done += 1
            if self.ctx.on_iteration is not None:
                self.ctx.on_iteration(self.done, float(strategy.loss.detach()))
            if self.done >= self.steps:
                strategy.stop_training()

    return TaskHeadsModel, Template, Budget


def task_dataset(task: Task, task_id: int):
    """A task's training set as an Avalanche dataset whose samples are (x, y, task_id)."""
    av = avalanche()
    data = task.train
    return av.utils.AvalancheDataset(
        [data], data_attributes=[av.utils.TaskLabels(av.utils.ConstantSequence(task_id, len(data)))])


def tensor_dataset(x: torch.Tensor, y: torch.Tensor, task_ids: List[int]):
    """Samples held as tensors (the replay buffer) as an Avalanche dataset of (x, y, task_id)."""
    av = avalanche()
    return av.utils.AvalancheDataset(
        [torch.utils.data.TensorDataset(x, y)], data_attributes=[av.utils.TaskLabels(list(task_ids))])


def _silent_evaluator():
    av = avalanche()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified": intended, evaluation is ours
        return av.plugins.EvaluationPlugin()


# ---- task metadata as tensors (learner state must be tensors only) --------------------------------

def encode_json(value: Any) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode_json(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))


def task_stand_in(name: str, classnames, templates) -> Task:
    """What ``adapter.head`` needs of a past task after a resume: its name, classes and templates
    (the head itself is the adapter's, cached per task and rebuilt identically if missing)."""
    return Task(name=name, classnames=tuple(classnames), templates=tuple(templates), train=None,
                val=None, test=None, fingerprint="")


@register_learner
@dataclasses.dataclass
class AvalancheLearner(GradientLearner):
    """``adam`` run through Avalanche's SupervisedTemplate; subclasses add plugins."""

    name = "avalanche"
    description = ("AdamW fine-tuning driven by Avalanche's SupervisedTemplate, no plugin "
                   "(reproduces `adam`; the control for ewc / er)")

    def __post_init__(self):
        self._tasks: Dict[int, Task] = {}  # task id (stream position, 0-based) -> task
        self._experiences = 0  # experiences trained so far: Avalanche's clock.train_exp_counter

    # ---- what subclasses provide ------------------------------------------------------------
    def plugins(self, ctx: FitContext) -> list:
        """Plugins kept across tasks (they hold the method's state). None for plain fine-tuning."""
        return []

    def before_train(self, template, ctx: FitContext) -> None: ...

    def after_train(self, template, ctx: FitContext) -> None: ...

    def fit_native(self, start: StateDict, ctx: FitContext) -> StateDict:
        """The same training without Avalanche, for adapters that are not classifiers (causal LMs):
        ``GradientLearner``'s loop (what the template reproduces for `adam`), with the subclass's
        method in its hooks. ``ewc`` and ``er`` override the hooks / the batches."""
        expert = GradientLearner.fit(self, start, ctx)
        self._experiences += 1
        return expert

    # ---- the shared head of a subclass's saved state ---------------------------------------------
    def _counter_state(self) -> Dict[str, Any]:
        """The experience count, and a ``native`` mark when the state comes from ``fit_native``."""
        state: Dict[str, Any] = {"experiences": torch.tensor([self._experiences])}
        if getattr(self, "_native", False):
            state["native"] = torch.tensor([1])
        return state

    def _load_counters(self, state: Dict[str, Any]) -> bool:
        """Restores what ``_counter_state`` saved; True when the state comes from ``fit_native``."""
        self._experiences = int(state["experiences"])
        if "native" in state:
            self._native = True
            return True
        return False

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, start: StateDict, ctx: FitContext) -> StateDict:
        self._check_budget()
        adapter, task = ctx.adapter, ctx.task
        if not hasattr(adapter, "logits"):
            # No classifier logits (e.g. the causal-LM adapter): the template's criterion(logits, y)
            # cannot carry the answer-token loss, so the method runs natively (``fit_native``).
            return self.fit_native(start, ctx)
        av = avalanche()
        TaskHeadsModel, Template, Budget = _classes()
        task_id = ctx.step - 1
        self._tasks[task_id] = task

        adapter.set_state(start)
        ctx.params = adapter.trainable_parameters()
        ctx.optimizer = self.make_optimizer(list(ctx.params.values()))
        scheduler = torch.optim.lr_scheduler.LambdaLR(ctx.optimizer, self.lr_factor)
        generator = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)

        experience = av.benchmarks.with_task_labels(
            av.benchmarks.DatasetExperience(dataset=task_dataset(task, task_id), current_experience=task_id))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plugin-compatibility chatter of the template
            template = Template(
                generator=generator, model=TaskHeadsModel(adapter, self._tasks), optimizer=ctx.optimizer,
                criterion=torch.nn.CrossEntropyLoss(), train_mb_size=self.batch_size,
                # enough epochs for `steps` iterations (>= 1 per epoch); Budget stops at `steps`
                train_epochs=self.steps, eval_mb_size=self.batch_size, device=adapter.device,
                plugins=[*self.plugins(ctx),
                         av.plugins.LRSchedulerPlugin(scheduler, step_granularity="iteration"),
                         Budget(self.steps, ctx)],
                evaluator=_silent_evaluator(), eval_every=-1)
        template.clock.train_exp_counter = self._experiences  # EWC indexes its penalties by it
        self.before_train(template, ctx)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            template.train(experience, eval_streams=[], drop_last=True,
                           num_workers=getattr(adapter, "num_workers", 0))
        for w in caught:
            # ReplayPlugin still calls the storage policy's `update`, deprecated in 0.6 (a decorator
            # that resets the warning filters itself, hence recording rather than filtering)
            if not (issubclass(w.category, DeprecationWarning) and "deprecated function update" in str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._experiences += 1
        self.after_train(template, ctx)
        ctx.optimizer.zero_grad(set_to_none=True)
        return adapter.get_state()
