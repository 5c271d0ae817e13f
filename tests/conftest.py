"""Shared fixtures: a temporary data cache, and one local Ray instance for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``APT_RAY_CACHE`` pointed at one temporary folder for the whole session (data built once)."""
    path = tmp_path_factory.mktemp("apt_ray_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APT_RAY_CACHE", str(path))
        yield path


# Ray Train's controller polls its workers every 2 s; polling faster shows reports, commits, failures and the
# end of a run sooner (the driver passes the setting on to the controller and the workers)
FAST_POLLING = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@pytest.fixture(scope="session")
def ray_cluster(ray_cache: Path) -> Iterator[None]:
    """One local Ray instance (2 CPUs, no dashboard, fast Train polling) shared by the tests that need Ray."""
    ray = pytest.importorskip("ray")
    from apt_ray.train.distributed import local_ray_env
    from apt_ray.train.ray_logs import QUIET_HOOK

    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAST_POLLING.items():
            mp.setenv(key, value)
        if ray.is_initialized():
            yield
            return
        local_ray_env()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": QUIET_HOOK})
        try:
            yield
        finally:
            ray.shutdown()
