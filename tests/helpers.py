"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from apt_ray.models.presets import build_backbone, get_preset
from apt_ray.models.vqa import VQAModel


def tiny_model(name: str = "tiny-vilt", num_answers: int = 10, seed: int = 0) -> VQAModel:
    torch.manual_seed(seed)
    return VQAModel(build_backbone(name, vocab_size=64), num_answers)


def tiny_batch(name: str = "tiny-vilt", batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    p = get_preset(name)
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, p.text_len, dtype=torch.long)
    mask[0, p.text_len // 2 :] = 0  # one padded example
    return {
        "input_ids": torch.randint(5, 64, (batch, p.text_len), generator=g),
        "attention_mask": mask,
        "pixel_values": torch.randn(batch, 3, *p.image_hw, generator=g),
    }


def load_script(relative: str):
    """A script of the repo that is not a package module (``studies/*.py``, ``benchmarks/*.py``), imported by path."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative
    name = "script_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    spec.loader.exec_module(module)
    return module


def sweep_child_runs(tmp_path, study: dict) -> list:
    """Run ``apt-ray sweep`` on ``study`` in a subprocess (its own cache, Ray temp folder and sqlite MLflow under
    ``tmp_path``: the session's stay as they are) and return the study's nested child runs from MLflow."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml
    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path}/m.db"
    env = {"APT_RAY_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": tempfile.mkdtemp(prefix="aptsw", dir="/tmp"),
           "PYTHONPATH": str(root), "RAY_DEDUP_LOGS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    proc = subprocess.run([str(Path(sys.executable).parent / "apt-ray"), "sweep", "--config", str(tmp_path / "study.yaml"),
                           "--tracking-uri", uri, "--storage-path", str(tmp_path / "sweep")], cwd=tmp_path,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(study["name"]).experiment_id])
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
