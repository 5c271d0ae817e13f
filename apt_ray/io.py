"""Result files written so that a crash never leaves a half-written file over a good one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from apt_ray.errors import UserError


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path``: into a temporary file beside it, then renamed over it.
    A path that cannot be written is a ``UserError`` naming it."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, target)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}): pick a writable path.") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
