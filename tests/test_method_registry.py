"""The method registry: a method declared and registered in one file (here: this test file) is a full citizen of
the CLI, the trial config, the sweep space and the training loop; registrations are checked and can be undone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import nn

from apt_ray.cli import build_parser, main
from apt_ray.config import TrainConfig, build_train_config
from apt_ray.errors import UserError
from apt_ray.methods import registry
from apt_ray.methods.base import AppliedMethod, prepare
from apt_ray.methods.registry import DEPTH, LR, MethodConfig, register_method, registered_method, unregister_method
from apt_ray.methods.sites import SiteMethod
from apt_ray.methods.spec import MethodSpec

TOY = "toy_bias"


class ToyConfig(MethodConfig):
    """A per-site learnable output bias: ``toy_width`` bias vectors per site, averaged."""

    toy_width: int = Field(4, ge=1, le=64, description="toy_bias: bias vectors per site")


class ToySite(SiteMethod):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.toy_bias = nn.Parameter(torch.zeros(width, hidden))

    def transform_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.toy_bias.mean(0).to(out.dtype)


def toy_apply(model, spec) -> AppliedMethod:
    spec, layers, sites = prepare(model, spec)
    w = spec.toy_width
    for site in sites:
        site.module.attach(ToySite(site.hidden_size, w))
    return AppliedMethod(spec, layers, sites, site_params=lambda s: w * s.hidden_size)


@pytest.fixture
def toy():
    """The toy method, registered for one test (the decorator form) and unregistered after it."""
    register_method(TOY, config=ToyConfig, searchable={"toy_width": ..., "depth": DEPTH, "lr": LR})(toy_apply)
    try:
        yield registry.get_method(TOY)
    finally:
        unregister_method(TOY)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APT_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_registration_reaches_config_spec_and_space(toy) -> None:
    assert TOY in registry.method_names()
    assert "toy_width" in TrainConfig.model_fields and "toy_width" in MethodSpec.model_fields
    assert TrainConfig.model_fields["toy_width"].description == "toy_bias: bias vectors per site"
    spec = MethodSpec(name=TOY, toy_width=8)
    assert spec.toy_width == 8 and spec.num_prompts == 16  # every knob answers on every spec
    assert spec.config() == ToyConfig(toy_width=8)
    cfg = build_train_config(overrides={"method": TOY, "toy_width": 5})
    assert cfg.method_spec().toy_width == 5
    from apt_ray.sweep.space import default_space

    space = default_space(TOY, 4, 128)
    assert list(space) == ["toy_width", "depth", "lr"]
    assert (space["toy_width"].type, space["toy_width"].low, space["toy_width"].high) == ("int", 1, 64)
    assert space["depth"].high == 4


def test_unregister_leaves_nothing_behind() -> None:
    before = (registry.method_names(), list(TrainConfig.model_fields), list(MethodSpec.model_fields))
    with registered_method(TOY, config=ToyConfig, apply=toy_apply):
        assert "toy_width" in TrainConfig.model_fields
    assert (registry.method_names(), list(TrainConfig.model_fields), list(MethodSpec.model_fields)) == before
    with pytest.raises(UserError, match="unknown method 'toy_bias'"):
        build_train_config(overrides={"method": TOY})
    with pytest.raises(UserError, match="unknown key 'toy_width'"):
        build_train_config(overrides={"toy_width": 3})


def test_toy_flag_is_in_profile_help(toy, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["profile", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--toy-width" in out and "bias vectors per site" in out and TOY in out
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "--toy-width" in sub.choices["profile"].format_help()  # build_parser() after registration has it too
    assert "--no-shared-kv" in out and "--no-project-queries" in out and "--no-deep-visual-prompts" in out


def test_boolean_knobs_keep_their_no_flags() -> None:
    from apt_ray.cli import method_spec_from_args

    parse = lambda *a: method_spec_from_args(build_parser().parse_args(["profile", *a]))  # noqa: E731
    spec = parse("--method", "kv_prompt", "--no-shared-kv", "--no-deep-visual-prompts", "--num-visual-prompts", "2")
    assert (spec.shared_kv, spec.deep_visual_prompts, spec.num_visual_prompts) == (False, False, 2)
    assert parse("--method", "deep_prompt", "--no-project-queries").project_queries is False
    assert parse("--method", "apt", "--train-scale").train_scale is True
    assert parse("--method", "apt").train_scale is None  # unset: the backbone's layout decides
    assert parse("--layers", "0,2", "--train-extras", "").layers == [0, 2]


def test_profile_counts_the_toy_parameters(toy, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "tiny-vilt", "--method", TOY, "--toy-width", "4", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["method"] == TOY
    hidden, sites = 128, prof["sites"]
    assert sites > 0
    assert prof["updated_params"] == prof["analytic_updated_params"] == sites * 4 * hidden


@pytest.mark.parametrize("value", ["0", "65"])
def test_bad_toy_width_is_one_line_naming_the_knob(toy, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "tiny-vilt", "--method", TOY, "--toy-width", value, "--json"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("apt-ray profile: error: ") and f"toy_width={value}" in err[0], err


def test_toy_trains_and_its_parameters_change(toy, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from apt_ray.train.checkpoint import METHOD_WEIGHTS
    from apt_ray.train.loop import train_loop_per_worker
    from apt_ray.train.session import latest_checkpoint

    res = train_loop_per_worker(dict(model="tiny-vilt", pretrained=False, num_train_images=48, num_val_images=12,
                                     questions_per_image=2, batch_size=8, epochs=1, max_steps=2, lr=3e-3,
                                     method=TOY, toy_width=3, output_dir=str(tmp_path)))
    assert res["global_step"] == 2
    weights = load_file(str(latest_checkpoint(tmp_path) / METHOD_WEIGHTS))
    toy_weights = {k: v for k, v in weights.items() if k.endswith("toy_bias")}
    assert toy_weights and all(v.shape[0] == 3 for v in toy_weights.values())
    assert all(v.abs().sum() > 0 for v in toy_weights.values())  # started at zero: every site's bias learned
    assert res["updated_params"] == sum(v.numel() for v in toy_weights.values())


def test_name_collision_raises_at_registration(toy) -> None:
    with pytest.raises(ValueError, match="method 'toy_bias' is registered twice"):
        register_method(TOY, config=ToyConfig, apply=toy_apply)
    with pytest.raises(ValueError, match="method 'apt' is registered twice"):
        register_method("apt", config=ToyConfig, apply=toy_apply)
    assert registry.get_method(TOY).config is ToyConfig and registry.get_method("apt").config.__name__ == "APTConfig"


def test_knob_clash_and_shadowing_are_refused() -> None:
    class BadRank(MethodConfig):
        rank: int = Field(8, ge=1, le=16)

    class ShadowsLr(MethodConfig):
        lr: float = 1.0

    names = registry.method_names()
    with pytest.raises(ValueError, match="knob 'rank'.*clashes with the 'rank' of method 'apt'"):
        register_method("bad_rank", config=BadRank, apply=toy_apply)
    with pytest.raises(ValueError, match="'lr' of shadows_lr would shadow"):
        register_method("shadows_lr", config=ShadowsLr, apply=toy_apply)
    assert registry.method_names() == names and "lr" not in MethodSpec.model_fields


def test_unknown_method_lists_the_registered_ones_with_a_did_you_mean(toy) -> None:
    with pytest.raises(UserError) as e:
        registry.get_method("toy_bais")
    assert "did you mean 'toy_bias'" in str(e.value) and "apt, deep_prompt" in str(e.value) and TOY in str(e.value)
    with pytest.raises(UserError, match="did you mean 'apt'"):
        build_train_config(overrides={"method": "aptt"})


def test_builtin_registry_matches_the_old_hard_coded_lists() -> None:
    assert registry.method_names() == ("apt", "deep_prompt", "kv_prompt", "lora", "adapter", "linear_probe", "head_only", "full")
    from apt_ray.sweep.grid import prompt_methods

    assert prompt_methods() == ("apt", "deep_prompt", "kv_prompt")
    assert registry.knob_users("rank") == ["apt", "lora"]


def test_registering_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, apt_ray.methods.spec; assert 'torch' not in sys.modules, 'torch imported'; print(len(apt_ray.methods.spec.METHOD_NAMES))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "8"
