"""The sweep directory: Tune's results, the Optuna study database, and a manifest to resume from.

    <storage_path>/
      sweep.json      manifest: the study spec, tracking URI and MLflow experiment
      mlflow_*        the MLflow writer's spool and ledger (trial -> run)
      optuna.db       the Optuna study (RDB storage, sqlite)
      tune/           Tune's experiment (trial results, searcher state)
      train/<trial>/  a multi-worker trial's Ray Train run (checkpoints)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apt_ray.errors import UserError

MANIFEST = "sweep.json"
TUNE_NAME = "tune"


@dataclass
class Manifest:
    """What a resumed sweep needs to continue where it stopped."""

    spec: dict[str, Any]
    tracking_uri: str
    experiment: str
    created: str


class SweepDir:
    """Paths of one sweep's directory."""

    def __init__(self, path: str | Path) -> None:
        text = str(path)
        if "://" in text:
            raise UserError(f"--storage-path {text}: use a filesystem path (on a cluster, a shared mount such as NFS); "
                            "the sweep keeps its Optuna database and manifest there.")
        self.root = Path(text).expanduser().resolve()

    @classmethod
    def default(cls, name: str, base: str | Path = "ray_results") -> "SweepDir":
        return cls(Path(base) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def tune_dir(self) -> Path:
        return self.root / TUNE_NAME

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def write(self, manifest: Manifest) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(manifest), indent=2))
        tmp.replace(self.manifest_path)

    def read(self) -> Manifest:
        try:
            return Manifest(**json.loads(self.manifest_path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"the sweep manifest {self.manifest_path} cannot be read ({e}): this is not a sweep directory apt_ray can resume.") from None

    def ensure_new(self) -> None:
        """Refuse to start a second sweep in a directory that holds one."""
        if self.exists():
            raise UserError(f"a sweep already exists at {self.root}: continue it with --resume, or start a new one with another --storage-path.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the sweep directory {self.root} ({e.strerror}): pick a writable --storage-path.") from None

    def ensure_resumable(self) -> Manifest:
        """The manifest of an earlier sweep here whose Tune state can be restored."""
        if not self.exists():
            raise UserError(f"--resume: there is no earlier sweep at {self.root} (no {MANIFEST}). Pass the --storage-path of the "
                            "interrupted sweep (printed when it started), or leave out --resume to start a new sweep.")
        manifest = self.read()
        from ray import tune

        if not tune.Tuner.can_restore(str(self.tune_dir)):
            raise UserError(f"--resume: the sweep at {self.root} never got as far as starting its trials ({self.tune_dir} holds no "
                            "Tune state): start it again without --resume, with a new --storage-path.")
        return manifest


def latest_sweep(name: str, base: str | Path = "ray_results") -> SweepDir:
    """The newest sweep directory of study ``name`` under ``base`` (for ``--resume`` without a path)."""
    found = sorted((p for p in Path(base).glob(f"{name}-*") if (p / MANIFEST).is_file()), key=lambda p: p.name)
    if not found:
        raise UserError(f"--resume: no earlier sweep of study '{name}' under ./{base}: pass the --storage-path of the sweep to continue.")
    return SweepDir(found[-1])
