"""cl_merge: continual learning x model merging benchmark harness.

The torchvision shim runs first: open_clip, avalanche and torchvision are imported later, by the
modules that need them, and on CPU torch they only import after the shim has run.
"""

from . import torchvision_shim  # noqa: F401  (must precede any open_clip/avalanche/torchvision import)

__version__ = "0.1.0"
