"""What a grid executor reports, whichever executor ran it (local loop, process pool or Ray)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List


@dataclasses.dataclass
class GridOutcome:
    ran: int = 0
    finished_before: int = 0
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)  # run id -> one-line error
    results: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # runs that ran now, config order
    attempts: Dict[str, int] = dataclasses.field(default_factory=dict)  # run id -> times started (Ray)
    resumed: Dict[str, int] = dataclasses.field(default_factory=dict)  # run id -> checkpoint step resumed from
    experts_planned: int = 0  # distinct experts of the grid's missing runs
    expert_uses: int = 0  # run steps that read a planned expert (= trainings without sharing)
    experts_trained: int = 0  # trained now by the expert tasks
    experts_cached: int = 0  # already in the cache
    experts_failed: Dict[str, str] = dataclasses.field(default_factory=dict)
    trained_in_runs: int = 0  # experts a run trained itself (unplanned), from the result files
    wall_s: float = 0.0

    @property
    def counts(self) -> Dict[str, int]:
        return {"ran": self.ran, "finished_before": self.finished_before, "failed": len(self.failed)}
