"""Built-in benchmark streams (imported as ``cl_merge.benchmarks``); importing registers them."""

from .mini import benchmark as _mini  # noqa: F401  (registration)
from .vision20 import benchmark as _vision20  # noqa: F401  (registration)
from .trace import benchmark as _trace  # noqa: F401  (registration)
from .mergebench import benchmark as _mergebench  # noqa: F401  (registration)
