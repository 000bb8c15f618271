"""Mini-suite override sets shared by the test modules (imported as ``_settings``: pytest puts tests/
on sys.path). Identical values across modules let one pytest session train each expert once through
the shared cache."""

# A small, fast configuration for end-to-end tests.
FAST = ["benchmark.num_tasks=3", "benchmark.n_train=96", "benchmark.n_val=32", "benchmark.n_test=96",
        "learner.steps=15"]

# Smaller still, for the SAR, leaderboard and plot tests, which run many strategies.
SMALL = ["benchmark.num_tasks=3", "benchmark.n_train=64", "benchmark.n_val=32", "benchmark.n_test=48",
         "learner.steps=8"]
