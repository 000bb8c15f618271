"""Built-in learners, mergers and strategies (imported as ``cl_merge.strategies``).

Importing this package registers them. Each module holds one learner or merger; ``catalog`` names
the (learner, merger, protocol, hyperparameters) combinations.
"""

from . import adam, checkpoint, identity, swa, task_arithmetic  # noqa: F401  (registration)
from . import magmax, opcm, ties  # noqa: F401  (registration: merging baselines)
from . import avalanche_learner, er, ewc  # noqa: F401  (registration: Avalanche-driven CL learners)
from . import isotropic, sa_bcd, sam  # noqa: F401  (registration: SAIM's SA-BCD + isotropic merge, SAM/ASAM)
from . import dare, epimer, fisher_merge, iso_merge, tsv_merge  # noqa: F401  (registration: multi-task mergers)
from . import continual_multitask  # noqa: F401  (registration: their continual variants)
from . import catalog  # noqa: F401  (must come after the components it names)
