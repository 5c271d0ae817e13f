"""Where a training loop runs: alone, or as a Ray Train worker.

The loop talks to a session (rank, world size, reporting, the checkpoint to
resume from); :class:`LocalSession` needs no Ray. The Ray session lives in
``apt_ray.train.ray_session`` and is imported only when Ray Train runs the loop.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

from apt_ray.train.checkpoint import is_checkpoint


class Session(Protocol):
    world_size: int
    rank: int

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None: ...

    def resume_checkpoint(self) -> Path | None: ...

    def checkpoint_scratch(self) -> Path: ...


def latest_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest checkpoint under ``path/checkpoints``."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    found = sorted(c for c in (p / "checkpoints").glob("step_*") if is_checkpoint(c))
    return found[-1] if found else None


def user_resume_checkpoint(resume_from: str | Path | None) -> Path | None:
    """The checkpoint a user's ``resume_from`` names (None when unset); refuses a path holding none."""
    if resume_from is None:
        return None
    found = latest_checkpoint(resume_from)
    if found is None:
        from apt_ray.errors import UserError

        raise UserError(f"resume_from '{resume_from}' holds no checkpoint: pass a checkpoint directory or an output_dir with checkpoints/step_*.")
    return found


class LocalSession:
    """A standalone run: checkpoints go to ``output_dir/checkpoints/step_N`` (the last ``keep`` kept)."""

    world_size = 1
    rank = 0

    def __init__(self, output_dir: str | Path, resume_from: str | Path | None = None, keep: int = 2) -> None:
        self.output_dir = Path(output_dir)
        self.resume_from = resume_from
        self.keep = keep
        self.history: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        root = self.output_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"step_{int(metrics['global_step']):08d}"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(checkpoint_dir), str(target))
        for old in sorted(root.glob("step_*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume_checkpoint(self) -> Path | None:
        return user_resume_checkpoint(self.resume_from)

    def checkpoint_scratch(self) -> Path:
        d = self.output_dir / ".scratch"
        d.mkdir(parents=True, exist_ok=True)
        return d
