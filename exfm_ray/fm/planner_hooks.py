"""How the FM planner listens to TorchRec's planner: keep the plan it chose instead of logging a
table, and silence one warning it repeats for every data-parallel table."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torchrec.distributed.planner.types import ShardingOption, Stats

DATA_PARALLEL_NOISE = "Sharding spec not found for "


@contextlib.contextmanager
def drop_root_warnings(prefix: str) -> Iterator[None]:
    """While planning, drop root-logger records whose message starts with `prefix` (and only those)."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class CaptureStats(Stats):
    """A planner Stats callback that keeps the chosen sharding options instead of logging a table."""

    def __init__(self) -> None:
        self.best_plan: list[ShardingOption] = []
        self.num_proposals = 0
        self.num_plans = 0

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans, run_time,
            best_plan, **kwargs) -> None:  # fmt: skip
        self.num_proposals, self.num_plans = num_proposals, num_plans
        # On failure the planner logs its last rejected proposal with rank -1 and an empty plan: keep successes.
        if sharding_plan.plan:
            self.best_plan = list(best_plan)
