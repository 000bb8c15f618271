"""Built-in learners, mergers and strategies (imported as ``cl_merge.strategies``).

Importing this package registers them. Each module holds one learner or merger; ``catalog`` names
the (learner, merger, protocol, hyperparameters) combinations.
"""

from . import adam, identity, swa, task_arithmetic  # noqa: F401  (registration)
from . import catalog  # noqa: F401  (must come after the components it names)
