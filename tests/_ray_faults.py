"""Fault injection for the Ray executor's tests, shipped to the workers through ``run_grid``'s
``around_run`` hook. Ray's workers cannot import this module (tests/ is not on their path), so the
tests register it with cloudpickle to travel by value."""

import contextlib
import os
from pathlib import Path


class DieAfterStep:
    """Around the run ``run_id``: its process exits hard (as if killed) right after the checkpoint of
    ``step`` is written, once (``marker`` records that it happened)."""

    def __init__(self, run_id: str, step: int, marker: str):
        self.run_id, self.step, self.marker = run_id, step, marker

    def __call__(self, config):
        return self._dying() if config.run_id() == self.run_id else None

    @contextlib.contextmanager
    def _dying(self):
        from cl_merge import runner

        base = runner.Checkpointer
        step, marker = self.step, self.marker

        class Dying(base):
            def save(self, t, record, tensors):
                super().save(t, record, tensors)
                if t == step and not os.path.exists(marker):
                    Path(marker).write_text(f"killed after step {t}\n")
                    os._exit(1)

        runner.Checkpointer = Dying
        try:
            yield
        finally:
            runner.Checkpointer = base
