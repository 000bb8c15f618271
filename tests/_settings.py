"""Mini-suite override sets shared by the test modules (imported as ``_settings``: pytest puts tests/
on sys.path). Identical values across modules let one pytest session train each expert once through
the shared cache."""

# A small, fast configuration for end-to-end tests.
FAST = ["benchmark.num_tasks=3", "benchmark.n_train=96", "benchmark.n_val=32", "benchmark.n_test=96",
        "learner.steps=15"]

# Smaller still, for the SAR, leaderboard and plot tests, which run many strategies.
SMALL = ["benchmark.num_tasks=3", "benchmark.n_train=64", "benchmark.n_val=32", "benchmark.n_test=48",
         "learner.steps=8"]


class Killed(RuntimeError):
    """Stands in for a process killed in the middle of a run."""


def kill_merges_at(monkeypatch, merger_cls, at_step):
    """Make ``merger_cls``'s merge step (its ``plan``, which the merge executor asks for first) raise
    ``Killed`` at step ``at_step`` (after the checkpoint of the step before); returns a function that
    restores the real merge, for the resumed run."""
    original = merger_cls.plan

    def dies(self, step, context):
        if step == at_step:
            raise Killed()
        return original(self, step, context)

    monkeypatch.setattr(merger_cls, "plan", dies)
    return lambda: monkeypatch.setattr(merger_cls, "plan", original)


# The smallest end-to-end run (2 tasks, 2 training steps): for the trust tests, which run many cases.
TINY = ["benchmark.num_tasks=2", "benchmark.n_train=64", "benchmark.n_val=32", "benchmark.n_test=48",
        "learner.steps=2"]
