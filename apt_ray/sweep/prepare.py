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
    cfg = spec.train_config({})
    if cfg.checkpoint or not cfg.pretrained or not cfg.model.startswith("tiny-") or cfg.data != "synthetic":
        return
    from apt_ray.train.pretrain import ensure_pretrained

    path = ensure_pretrained(cfg.model, cfg.data_spec())
    log.info("self-pretrained %s backbone: %s", cfg.model, path)
