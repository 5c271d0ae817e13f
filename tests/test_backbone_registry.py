"""The backbone registry: a backbone defined outside apt_ray (``tests/toy_backbone.py``, shared with the task registry
tests) registers itself and its preset, and the profiler, the methods and the CLI use it with nothing in apt_ray
changed; name collisions and unknown names."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from apt_ray.cli import main
from apt_ray.errors import UserError
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.backbone import Backbone
from apt_ray.models.presets import build_backbone, check_model_type, get_preset
from apt_ray.models.registry import Preset, RegistryError, get_backbone, preset_names, register_backbone, register_preset
from apt_ray.profile import profile
from tests.toy_backbone import TOY, ToyBackbone, toy_config  # defined (and registered) outside apt_ray

SITE_METHODS = ["apt", "deep_prompt", "kv_prompt", "lora", "adapter", "head_only", "linear_probe", "full"]


def test_the_toy_is_registered_and_implements_the_protocol():
    preset = get_preset(TOY)
    assert preset.family == "toy" and not preset.self_pretrained and preset.meta_profile
    assert preset.backbone.cls is ToyBackbone and preset.processor == "vilt"
    assert TOY in preset_names() and {"tiny-vilt", "tiny-meter"} <= set(preset_names())
    backbone = build_backbone(TOY)
    assert isinstance(backbone, ToyBackbone) and isinstance(backbone, Backbone)


def test_builtin_backbones_implement_the_protocol():
    for name in ("tiny-vilt", "tiny-meter"):
        assert isinstance(build_backbone(name), Backbone), name
    assert get_preset("tiny-vilt").self_pretrained and get_preset("tiny-meter").self_pretrained
    assert not get_preset("vilt-b32").self_pretrained and not get_preset("meter-clip16-roberta").self_pretrained
    assert get_preset("tiny-meter").meta_profile and not get_preset("tiny-vilt").meta_profile


@pytest.mark.parametrize("method", SITE_METHODS)
def test_profile_runs_on_the_toy_with_measured_equal_to_analytic(method):
    spec = MethodSpec(name=method, num_prompts=6, rank=4, num_visual_prompts=3 if method == "kv_prompt" else 0)
    prof = profile(TOY, spec)
    assert prof.model == TOY and prof.method == method
    assert prof.measured_additional_gmacs == pytest.approx(prof.analytic_additional_gmacs, rel=1e-9, abs=1e-12)
    assert prof.updated_params == prof.analytic_updated_params
    if method in ("apt", "deep_prompt", "kv_prompt", "lora", "adapter"):
        assert prof.sites == 2 and prof.additional_gmacs > 0
    if method == "kv_prompt":  # the visual prompts join the joint stream
        assert prof.stream_lengths == {"joint": 12 + 17 + 3}


def test_profile_on_the_cpu_matches_the_meta_device():
    spec = MethodSpec(name="kv_prompt", num_prompts=6, num_visual_prompts=3)
    on_meta, on_cpu = profile(TOY, spec), profile(f"{TOY}-cpu", spec)
    assert not get_preset(f"{TOY}-cpu").meta_profile
    assert on_cpu.measured_additional_gmacs == pytest.approx(on_cpu.analytic_additional_gmacs, rel=1e-9)
    assert on_cpu.total_gmacs == pytest.approx(on_meta.total_gmacs, rel=1e-9) and on_cpu.base_gmacs > 0


def test_cli_profiles_the_toy(capsys):
    assert main(["profile", "--model", TOY, "--method", "apt", "--num-prompts", "4", "--rank", "2", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["model"] == TOY and prof["sites"] == 2
    assert math.isclose(prof["measured_additional_gmacs"], prof["analytic_additional_gmacs"], rel_tol=1e-9)


def test_toy_checkpoints_round_trip_and_are_type_checked(tmp_path):
    torch.manual_seed(0)
    model = build_backbone(TOY)
    model.save_pretrained(tmp_path / "toy")
    check_model_type(tmp_path / "toy", "toy")
    loaded = build_backbone(TOY, tmp_path / "toy")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match="holds a 'apt_ray_toy' model, not a vilt backbone"):
        build_backbone("tiny-vilt", tmp_path / "toy")


def test_registering_a_name_twice_raises():
    with pytest.raises(RegistryError, match="backbone 'toy' is already registered"):
        register_backbone("toy", model_type="x", processor="vilt")(type("Other", (nn.Module,), {}))
    with pytest.raises(RegistryError, match="backbone 'vilt' is already registered"):
        register_backbone("vilt", model_type="x", processor="vilt")(type("Other", (nn.Module,), {}))
    with pytest.raises(RegistryError, match="preset 'tiny-meter' is already registered"):
        register_preset(Preset("tiny-meter", "toy", 12, (32, 32), 8, toy_config, "a clash"))
    with pytest.raises(RegistryError, match=f"preset '{TOY}' is already registered"):
        register_preset(Preset(TOY, "toy", 12, (32, 32), 8, toy_config, "a clash"))
    assert get_preset("tiny-meter").family == "meter" and get_backbone("toy").cls is ToyBackbone


def test_unknown_names_list_the_registered_ones_with_a_did_you_mean():
    with pytest.raises(UserError) as err:
        get_preset("tiny-vit")
    msg = str(err.value)
    assert "unknown model 'tiny-vit'" in msg and "did you mean 'tiny-vilt'" in msg
    for name in ("vilt-b32", "tiny-vilt", "meter-clip16-roberta", "tiny-meter", TOY):
        assert name in msg
    with pytest.raises(UserError, match="did you mean 'toy-2l'"):
        get_preset("toy-2")
    with pytest.raises(UserError) as err:
        get_preset("zzzzzz")
    assert "did you mean" not in str(err.value) and "choose one of" in str(err.value)
    with pytest.raises(UserError, match="unknown backbone 'meterr'.*did you mean 'meter'"):
        get_backbone("meterr")
