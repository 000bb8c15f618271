"""Experiment tracking: ``run.log=tensorboard,wandb,mlflow`` (any subset; default none).

One interface, one class per backend. The protocol loop calls ``Trackers.after_step`` with each
step's ``StepRecord`` (``after_merge`` for the multitask protocol's one merge), the runner calls
``start`` before the first step and ``after_run`` once the results file is written. What is logged:

- parameters: benchmark, strategy, learner, merger, protocol, order, seed, run id and every
  hyperparameter (``learner.*``, ``merger.*``, ``benchmark.*``, ``run.*``);
- per step t: ``acc/<task>`` (the deployed model's row of the accuracy matrix), ``acc_seen`` and
  ``bwt`` (ACC and BWT of the t × t matrix so far: ``metrics.acc``/``metrics.bwt`` on rows 0..t,
  columns 1..t), ``acc_all`` (mean over every evaluated task), ``expert_acc``, ``sar`` and
  ``sar_current`` (when recorded), ``time/fit_s``, ``time/merge_s``, ``time/eval_s``, ``time/sar_s``;
- after the run: ``final/acc``, ``final/bwt``, ``final/fwt``, ``final/normalized_acc``, ``final/sar``,
  ``time/wall_s``, and the results JSON as an artifact (TensorBoard: a text summary and a copy of
  the file beside the event files).

Where: ``run.log_dir`` (default ``<out>/.tracking``): TensorBoard event files in
``tensorboard/<run id>/``, wandb's files in ``wandb/`` (online or offline as wandb is configured:
``wandb login`` or ``WANDB_MODE=offline``), MLflow's file store in ``mlruns/`` unless
``MLFLOW_TRACKING_URI`` names a server or database. ``run.log_project`` names the wandb project and
the MLflow experiment. These are output settings: they change neither the run id nor the results
file. Backends are imported only when named, so a run without trackers imports none of them. A
backend that fails during a run is reported on one line and dropped; the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import metrics
from .errors import UserError
from .io import warn

BACKENDS = ("tensorboard", "wandb", "mlflow")


def parse_log(text: Optional[str]) -> List[str]:
    """``run.log``'s value as backend names (empty for none); an unknown name is one clear error."""
    if text is None:
        return []
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"run.log: unknown tracker {unknown[0]!r}; use any of {', '.join(BACKENDS)} "
                         "(comma-separated), e.g. run.log=tensorboard,mlflow")
    return list(dict.fromkeys(names))


# ---- what is logged ------------------------------------------------------------------------------------
def parameters(config) -> Dict[str, Any]:
    from .runner import recorded_settings

    out: Dict[str, Any] = {"benchmark": config.benchmark, "strategy": config.label, "learner": config.learner,
                           "merger": config.merger, "protocol": config.protocol, "order": config.order,
                           "seed": config.seed, "run_id": config.run_id()}
    out.update(config.hyperparameters())
    out.update({f"run.{k}": v for k, v in recorded_settings(config.run_params).items()})
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def step_metrics(step: int, tasks: Sequence[str], record: Dict[str, Any], index: int,
                 expert_acc: Optional[float], continual: bool = True) -> Dict[str, float]:
    """The metrics of step ``step``; ``index`` is its position in the record's per-step lists
    (``continual=False``: the multitask merge, which has no t × t matrix)."""
    matrix = record["acc_matrix"]
    row = matrix[index + 1]
    out: Dict[str, Any] = {f"acc/{name}": v for name, v in zip(tasks, row) if v is not None}
    if continual:  # the t × t matrix so far: rows 0..t, columns 1..t
        seen = [r[:step] for r in matrix[:step + 1]]
        out["acc_seen"] = metrics.acc(seen)
        out["bwt"] = metrics.bwt(seen)
    evaluated = [v for v in row if v is not None]
    out["acc_all"] = sum(evaluated) / len(evaluated) if evaluated else None
    out["expert_acc"] = expert_acc
    for key in ("sar", "sar_current"):
        values = record.get(key) or []
        out[key] = values[index] if index < len(values) else None
    timings = (record.get("step_timings") or [])
    for key, value in (timings[index] if index < len(timings) else {}).items():
        out[f"time/{key}"] = value
    return {k: float(v) for k, v in out.items() if _finite(v)}


def final_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    out = {f"final/{k}": result.get(k) for k in ("acc", "bwt", "fwt", "normalized_acc")}
    out["final/sar"] = (result.get("sar") or [None])[-1]
    out["time/wall_s"] = (result.get("timings") or {}).get("wall_s")
    return {k: float(v) for k, v in out.items() if _finite(v)}


# ---- backends -------------------------------------------------------------------------------------------
class Tracker:
    """One backend. ``start`` opens its run, ``log`` writes metrics at a step, ``finish`` writes the
    final metrics and the results file, ``close`` ends its run (``failed``: the run did not finish)."""

    name = ""

    def start(self, params: Dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, values: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, values: Dict[str, float], step: int, results_path: Path) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: Path, run_id: str, project: str):
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(log_dir) / "tensorboard" / run_id
        self.writer = SummaryWriter(log_dir=str(self.directory))
        self._started = False

    def start(self, params: Dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        exp, ssi, _ = hparams(values, {k: 0.0 for k in ("final/acc", "final/bwt", "final/sar")})
        for summary in (exp, ssi):
            self.writer.file_writer.add_summary(summary)
        self._started = True
        self.writer.add_text("config", "```json\n" + json.dumps(params, indent=1, default=str) + "\n```")

    def log(self, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, values: Dict[str, float], step: int, results_path: Path) -> None:
        self.log(values, step)
        self.writer.add_text("results_json", "```json\n" + Path(results_path).read_text() + "\n```", global_step=step)
        shutil.copyfile(results_path, self.directory / Path(results_path).name)

    def close(self, failed: bool) -> None:
        if self._started:  # the hparams session ends with the run's status
            from tensorboard.plugins.hparams import api_pb2

            self.writer.file_writer.add_summary(_session_end(api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS))
        self.writer.close()


def _session_end(status):
    """The hparams plugin's session-end summary with ``status`` (success or failure)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=status),
                                                version=0)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                      content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, log_dir: Path, run_id: str, project: str):
        import wandb

        self.wandb, self.run_id, self.project = wandb, run_id, project
        self.directory = Path(log_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = None

    def start(self, params: Dict[str, Any]) -> None:
        try:
            self.run = self.wandb.init(project=self.project, name=self.run_id, dir=str(self.directory),
                                       config=params, group=f"{params['benchmark']}/{params['strategy']}",
                                       job_type=str(params["protocol"]), reinit="create_new")
        except Exception as exc:  # no login, no network, bad settings: before the run starts
            raise UserError(f"run.log=wandb: wandb could not start a run ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); run `wandb login`, or set "
                            "WANDB_MODE=offline to log to files only") from None

    def log(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, values: Dict[str, float], step: int, results_path: Path) -> None:
        self.run.log(values, step=step)
        self.run.summary.update(values)
        artifact = self.wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "-", f"results-{self.run_id}"), type="results")
        artifact.add_file(str(results_path), name="results.json")
        self.run.log_artifact(artifact)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, log_dir: Path, run_id: str, project: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store in the log directory; MLflow 3 asks to opt in to it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(log_dir).resolve() / "mlruns").as_uri()
        self.uri, self.run_id, self.project = uri, run_id, project
        self.client = MlflowClient(tracking_uri=uri)
        self.mlflow_run = None

    def start(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(self.project)
        experiment = found.experiment_id if found else self.client.create_experiment(self.project)
        self.mlflow_run = self.client.create_run(experiment, run_name=self.run_id, tags={
            "benchmark": str(params["benchmark"]), "strategy": str(params["strategy"]),
            "protocol": str(params["protocol"])})
        self.client.log_batch(self.mlflow_run.info.run_id,
                              params=[Param(_key(k), str(v)[:500]) for k, v in params.items()])

    def log(self, values: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.mlflow_run.info.run_id,
                              metrics=[Metric(_key(k), v, now, step) for k, v in values.items()])

    def finish(self, values: Dict[str, float], step: int, results_path: Path) -> None:
        self.log(values, step)
        self.client.log_artifact(self.mlflow_run.info.run_id, str(results_path))

    def close(self, failed: bool) -> None:
        if self.mlflow_run is not None:
            self.client.set_terminated(self.mlflow_run.info.run_id, status="FAILED" if failed else "FINISHED")
            self.mlflow_run = None


def _key(name: str) -> str:
    """MLflow's allowed characters in names (alphanumerics, _ - . / and space)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


# ---- the hooks the run calls ----------------------------------------------------------------------------
class Trackers:
    """Every backend of ``run.log`` for one run. A backend that raises during the run is reported on
    one line and dropped (the run's results never depend on a tracker)."""

    def __init__(self, names: Sequence[str], config, log_dir: Path):
        self.config, self.tasks = config, []
        self.logged = 0  # the last step logged (a resumed run logs its earlier steps from the record)
        self.backends: List[Tracker] = []
        for name in names:
            try:
                self.backends.append(CLASSES[name](Path(log_dir), config.run_id(), config.run_params["log_project"]))
            except ImportError as exc:
                raise UserError(f"run.log={name}: {exc.name or name} is not installed; pip install -e \".[tracking]\" "
                                "(or drop it from run.log)") from None

    def start(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        params = parameters(self.config)
        for backend in list(self.backends):
            if isinstance(backend, WandbTracker):
                backend.start(params)  # a wandb that cannot start is the user's to fix, before the run
            else:
                self._call(backend, "start", params)

    def _call(self, backend: Tracker, method: str, *args) -> None:
        try:
            getattr(backend, method)(*args)
        except UserError:
            raise
        except Exception as exc:
            warn(f"run.log={backend.name}: {method} failed ({exc.__class__.__name__}: {exc}); "
                 f"{backend.name} is left out of the rest of this run")
            self.backends.remove(backend)

    def _log(self, values: Dict[str, float], step: int) -> None:
        for backend in list(self.backends):
            self._call(backend, "log", values, step)

    def after_step(self, step, record: Dict[str, Any]) -> None:
        """After step ``step.step`` (a ``protocol.StepRecord``) was appended to ``record``."""
        for earlier in range(self.logged + 1, step.step):  # resumed: the steps restored from the checkpoint
            self._log(step_metrics(earlier, self.tasks, record, earlier - 1, record["expert_acc"][earlier - 1]), earlier)
        self._log(step_metrics(step.step, self.tasks, record, step.step - 1, step.expert_acc), step.step)
        self.logged = step.step

    def after_merge(self, record: Dict[str, Any]) -> None:
        """After the multitask protocol's one merge of all T experts (logged at step T)."""
        T = len(self.tasks)
        experts = [v for v in record["expert_acc"] if v is not None]
        self._log(step_metrics(T, self.tasks, record, len(record["acc_matrix"]) - 2,
                               sum(experts) / len(experts) if experts else None, continual=False), T)
        self.logged = T

    def after_run(self, result: Dict[str, Any], results_path: Path) -> None:
        """Once the results file is written (diverged runs too)."""
        step = max(self.logged, 1)
        for backend in list(self.backends):
            self._call(backend, "finish", final_metrics(result), step, Path(results_path))

    def close(self, failed: bool) -> None:
        for backend in list(self.backends):
            self._call(backend, "close", failed)
        self.backends = []


def open_trackers(config, settings, out_dir: Path) -> Optional[Trackers]:
    names = parse_log(settings.log)
    if not names:
        return None
    log_dir = Path(settings.log_dir) if settings.log_dir else Path(out_dir) / ".tracking"
    return Trackers(names, config, log_dir)
