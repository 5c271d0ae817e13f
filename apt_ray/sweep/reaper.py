"""Free the CPUs/GPUs of trials that Tune stopped (ASHA), when Ray runs without its dashboard.

A Ray Train V2 run reserves its workers in a placement group created by its
controller actor. When Tune stops a trial (an ASHA decision, or the last rung),
it ends the trial's process and the controller dies with it; Ray Train's own
``PlacementGroupCleaner`` then removes the group, but it finds out through the
State API, which needs the dashboard. Without the dashboard (a minimal Ray
install) the group stays reserved, and the next trials wait for CPUs forever.

This Tune callback removes, from the sweep's own job only, placement groups
whose creating actor is dead: nothing can use them any more.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

log = logging.getLogger("apt_ray.sweep")
_LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def orphaned_placement_groups() -> list[bytes]:
    """Ids of this job's placement groups whose creator actor is dead (driver-created groups excluded)."""
    import ray
    from ray._private.state import state  # GCS table: works without the dashboard
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    states = gcs_pb2.PlacementGroupTableData.PlacementGroupState
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = pg.creator_actor_id and set(pg.creator_actor_id) != {0xFF}
        if (created_by_actor and pg.creator_actor_dead and not pg.is_detached and pg.creator_job_id.hex() == job
                and states.Name(pg.state) in _LIVE_STATES):
            out.append(pg.placement_group_id)
    return out


def reap_orphaned_placement_groups() -> int:
    """Remove the orphaned placement groups; returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup

    removed = 0
    for pg_id in orphaned_placement_groups():
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
        removed += 1
    if removed:
        log.info("freed %d placement group(s) left by stopped trials", removed)
    return removed


class PlacementGroupReaper(Callback):
    """Runs the reaper every ``interval_s`` seconds of the Tune loop and when a trial ends."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self._disabled = False

    def _reap(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._disabled or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        try:
            reap_orphaned_placement_groups()
        except Exception as e:  # noqa: BLE001 - private Ray API: if it changes, fall back to Ray's own cleaner
            log.warning("placement group reaper disabled (%s: %s)", type(e).__name__, e)
            self._disabled = True

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._reap()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._reap(force=True)
