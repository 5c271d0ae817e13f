"""Work a local sweep does once on the driver before any trial: the self-pretrained tiny backbone.

Left to the trials, the first two would both wait on the cache lock while one
of them pretrains on a single worker CPU; on the driver it uses every core.
"""

from __future__ import annotations

import logging

from apt_ray.sweep.spec import StudySpec

log = logging.getLogger("apt_ray.sweep")


def prepare_pretrained_backbone(spec: StudySpec) -> None:
    """Build (or find in the cache) the tiny backbone the trials load, when they load one."""
    from apt_ray.train.loop import self_pretrained_backbone

    path = self_pretrained_backbone(spec.train_config({}))
    if path is not None:
        log.info("self-pretrained %s backbone: %s", spec.model, path)
