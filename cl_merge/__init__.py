"""cl_merge: continual learning x model merging benchmark harness.

The Python API (docs/api.md)::

    import cl_merge
    result = cl_merge.run(benchmark="mini", strategy="c-ta", overrides={"benchmark.num_tasks": 3})
    results = cl_merge.load_results("results/runs")
    board = cl_merge.leaderboard("results/leaderboard_mini.toml", report_only=True)

The torchvision shim runs first: open_clip, avalanche and torchvision are imported later, by the
modules that need them, and on CPU torch they only import after the shim has run. The API's names are
imported on first use (``import cl_merge`` stays light).
"""

from . import torchvision_shim  # noqa: F401  (must precede any open_clip/avalanche/torchvision import)

__version__ = "0.1.0"
__all__ = ["Leaderboard", "Result", "__version__", "leaderboard", "load_results", "run"]

_API = {"run", "load_results", "leaderboard", "Result", "Leaderboard"}


def __getattr__(name: str):
    if name == "leaderboard":  # the submodule, callable as the API's leaderboard (cl_merge.leaderboard doc)
        import importlib

        return importlib.import_module(".leaderboard", __name__)
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cl_merge' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | _API)
