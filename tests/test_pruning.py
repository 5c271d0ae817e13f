"""E2VPT-style prompt pruning: which tokens the masks cut, that a pruned model is the unpruned one without those
tokens, that its cost is the closed form with k prompts, and that a run resumed inside the rewind ends the same."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apt_ray import methods
from apt_ray.cli import main
from apt_ray.config import build_train_config
from apt_ray.methods.configs.pruning import kept_prompts
from apt_ray.methods.pruning import (
    detach_masks, importance_scores, prompt_sites, prune, row_counts, select,
)
from apt_ray.methods.spec import MethodSpec
from apt_ray.profile.cost import measure_macs
from apt_ray.train.checkpoint import METHOD_WEIGHTS
from apt_ray.train.loop import Trainer
from apt_ray.train.session import LocalSession
from tests.helpers import tiny_batch, tiny_model

PROMPT_METHODS = ["kv_prompt", "deep_prompt", "apt"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APT_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _applied(backbone: str, method: str, p: int, seed: int = 0, **kw):
    model = tiny_model(backbone, seed=seed)
    torch.manual_seed(seed + 1)
    applied = methods.apply(model, MethodSpec(name=method, num_prompts=p, **kw))
    model.eval()
    return model, applied


def _batch_inputs(backbone: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_batch(backbone, seed=seed)


# -- which tokens are cut ---------------------------------------------------------------------------------------

def test_the_k_rule():
    assert kept_prompts(32, 0.25) == 8  # 0.25 * 32 stays 8 despite float rounding
    assert kept_prompts(10, 0.3) == 3 and kept_prompts(10, 0.31) == 4  # ceil: never fewer than asked
    assert kept_prompts(5, 0.01) == 1 and kept_prompts(16, 1.0) == 16
    assert kept_prompts(32, 0.25, "segment", 4) == 8  # one segment of 8
    assert kept_prompts(32, 0.3, "segment", 4) == 16  # ceil(1.2) = 2 whole segments


def test_masks_prune_exactly_the_lowest_scored_tokens():
    g = torch.Generator().manual_seed(0)
    scores = {f"site{i}": torch.rand(12, generator=g) for i in range(3)}
    scores["tied"] = torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0, 0.1])
    kept = select(scores, keep=0.5)
    for name, s in scores.items():
        k = math.ceil(0.5 * len(s))
        # by hand: drop the len(s) - k lowest scores (on a tie, the later token goes first)
        ranked = sorted(range(len(s)), key=lambda i: (float(s[i]), -i))
        dropped = set(ranked[: len(s) - k])
        assert kept[name] == [i for i in range(len(s)) if i not in dropped]
    assert kept["tied"] == [0, 1, 4]


def test_segments_are_cut_whole():
    scores = {"a": torch.tensor([0.3, 0.9, 0.1, 0.5])}  # 4 segments of 3 tokens
    kept = select(scores, keep=0.5, rows={"a": 12})
    assert kept["a"] == [3, 4, 5, 9, 10, 11]  # segments 1 and 3, every token of each


@pytest.mark.parametrize("method", ["kv_prompt", "apt"])
def test_scores_are_the_mean_gradient_size_of_a_mask_on_the_prompt_rows(method):
    """Independent reference: with the mask at 1, dL/dm_i is the inner product of row i of P with dL/dP_i."""
    model, _ = _applied("tiny-vilt", method, 6)
    batches = [_batch_inputs("tiny-vilt", seed=s) for s in (0, 1)]
    target = torch.zeros(2, 10)
    target[:, 3] = 1.0

    def loss_of(batch):
        return F.binary_cross_entropy_with_logits(model(**batch), target)

    totals, count = importance_scores(model, batches, loss_of)
    sites = prompt_sites(model)
    expected = {n: torch.zeros(6, dtype=torch.float64) for n in sites}
    for batch in batches:
        params = [getattr(s, "key_prompts" if method == "kv_prompt" else "prompts") for s in sites.values()]
        grads = torch.autograd.grad(loss_of(batch), params)
        for n, p, g in zip(sites, params, grads):
            expected[n] += (p * g).sum(-1).double().abs()
    assert count == 2
    for n in sites:
        torch.testing.assert_close(totals[n], expected[n], rtol=1e-4, atol=1e-9)
    assert all(s.row_mask is None for s in sites.values())  # the masks are gone again
    assert all(p.grad is None for p in model.parameters())  # and no parameter was given a gradient


# -- a pruned model is the unpruned one without those tokens -------------------------------------------------------

@contextlib.contextmanager
def _prompt_columns_removed(model, dropped: dict[str, list[int]], num_prompts: int):
    """Run ``model`` with each site's ``dropped`` prompt keys masked out of its attention (an explicit boolean
    attention mask over the appended prompt columns), leaving its parameters as they are."""
    from apt_ray.methods.sites import SiteAttention

    current: list[str] = []
    by_site = {name.rsplit(".site_methods.", 1)[0]: drop for name, drop in dropped.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, path=path: current.append(path))
               for path, m in model.named_modules() if isinstance(m, SiteAttention)]
    sdpa = F.scaled_dot_product_attention

    def masked_sdpa(q, k, v, attn_mask=None, **kw):
        drop = by_site.get(current[-1]) if current else None
        if not drop:
            return sdpa(q, k, v, attn_mask=attn_mask, **kw)
        allow = torch.ones(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.bool)
        first = k.shape[2] - num_prompts
        allow[..., [first + j for j in drop]] = False
        if attn_mask is None:
            mask = allow
        elif attn_mask.dtype == torch.bool:
            mask = attn_mask & allow
        else:
            mask = attn_mask + torch.zeros_like(allow, dtype=attn_mask.dtype).masked_fill(~allow, float("-inf"))
        return sdpa(q, k, v, attn_mask=mask, **kw)

    F.scaled_dot_product_attention = masked_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()


@pytest.mark.parametrize("backbone", ["tiny-vilt", "tiny-meter"])
@pytest.mark.parametrize("method", ["kv_prompt", "deep_prompt"])
def test_pruned_model_equals_the_unpruned_with_those_tokens_attention_removed(backbone, method):
    p = 8
    model, _ = _applied(backbone, method, p, num_visual_prompts=0) if method == "kv_prompt" else _applied(backbone, method, p)
    g = torch.Generator().manual_seed(5)
    scores = {n: torch.rand(p, generator=g) for n in prompt_sites(model)}
    kept = select(scores, keep=0.5)
    dropped = {n: [i for i in range(p) if i not in k] for n, k in kept.items()}
    batch = _batch_inputs(backbone)
    with torch.no_grad():
        full = model(**batch)
        with _prompt_columns_removed(model, dropped, p):
            reference = model(**batch)
        prune(model, kept)
        pruned = model(**batch)
    assert all(s.num_rows == p // 2 for s in prompt_sites(model).values())
    assert (pruned - reference).abs().max().item() < 1e-6
    assert (pruned - full).abs().max().item() > 1e-5  # the cut tokens did matter


@pytest.mark.parametrize("backbone", ["tiny-vilt", "tiny-meter"])
def test_pruned_apt_equals_the_unpruned_with_those_prompts_similarities_zeroed(backbone):
    """APT has no softmax over its prompts: removing prompt j takes its column out of S = relu(X K~^T) and its row out
    of the diffusion S P; the reference zeroes both through a 0/1 mask on the rows of P (w = max_j S is unchanged by
    zero columns, as S >= 0)."""
    p = 8
    model, _ = _applied(backbone, "apt", p)
    for site in prompt_sites(model).values():  # a non-zero B, so that the low-rank keys take part
        torch.nn.init.normal_(site.lora_b, std=0.05)
    scores = {n: torch.rand(p, generator=torch.Generator().manual_seed(7)) for n in prompt_sites(model)}
    kept = select(scores, keep=0.25)
    batch = _batch_inputs(backbone)
    with torch.no_grad():
        for name, site in prompt_sites(model).items():
            site.row_mask = torch.zeros(p).index_fill_(0, torch.tensor(kept[name]), 1.0)
        reference = model(**batch)
        detach_masks(model)
        full = model(**batch)
        prune(model, kept)
        pruned = model(**batch)
    assert (pruned - reference).abs().max().item() < 1e-6
    assert (pruned - full).abs().max().item() > 1e-6


# -- cost: the closed form with k prompts ---------------------------------------------------------------------

def _profile_json(args: list[str], capsys) -> dict:
    assert main(["profile", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_profile_of_a_pruned_method_is_the_closed_form_with_k_prompts(method, capsys):
    base = ["--model", "tiny-meter", "--method", method]
    pruned = _profile_json([*base, "--num-prompts", "32", "--prune-keep", "0.25"], capsys)
    direct = _profile_json([*base, "--num-prompts", "8"], capsys)
    for key in ("updated_params", "analytic_updated_params", "additional_gmacs", "measured_additional_gmacs",
                "analytic_additional_gmacs", "trainable_params", "num_prompts"):
        assert pruned[key] == direct[key], key
    assert pruned["pruning"]["trained_prompts"] == 32 and pruned["pruning"]["kept_prompts"] == 8
    assert direct["pruning"] == {}
    segment = _profile_json([*base, "--num-prompts", "32", "--prune-keep", "0.3", "--prune-mode", "segment"], capsys)
    assert segment["pruning"]["kept_prompts"] == 16 and segment["pruning"]["kept_segments"] == 2
    assert "whole segments" in segment["pruning"]["rule"]
    assert segment["additional_gmacs"] == _profile_json([*base, "--num-prompts", "16"], capsys)["additional_gmacs"]


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_a_physically_pruned_model_measures_as_the_k_prompt_model(method):
    model, _ = _applied("tiny-vilt", method, 12)
    scores = {n: torch.rand(12) for n in prompt_sites(model)}
    prune(model, select(scores, keep=0.25))
    fresh, applied = _applied("tiny-vilt", method, 3)
    inputs = {k: v[:1] for k, v in _batch_inputs("tiny-vilt").items()}
    assert measure_macs(model, inputs)[0] == measure_macs(fresh, inputs)[0]
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(model) == count(fresh)
    assert sum(p.numel() for p in model.method_parameters()) == applied.analytic_params()
    assert row_counts(model) == row_counts(fresh)


# -- training: score, cut, rewind; resume inside the rewind ------------------------------------------------------

TINY = dict(model="tiny-vilt", pretrained=False, num_train_images=32, num_val_images=8, questions_per_image=2,
            batch_size=8, epochs=1, lr=3e-3, method="kv_prompt", num_prompts=4, prune_keep=0.5, rewind_epochs=2)


def test_trial_prunes_rewinds_and_resumes_inside_the_rewind(tmp_path: Path):
    cfg = build_train_config(overrides={**TINY, "output_dir": str(tmp_path / "full")})
    full = Trainer(cfg, LocalSession(tmp_path / "full", keep=5))
    trained = {}
    score = full.__class__._next_epoch

    def spy(self):  # the prompts' trained values just before the cut
        if self.pruned is None and self.epoch == cfg.epochs:
            trained.update({n: s.key_prompts.detach().clone() for n, s in prompt_sites(self.model).items()})
        return score(self)

    full._next_epoch = spy.__get__(full)  # type: ignore[method-assign]
    result = full.fit()
    per_epoch = full.steps_per_epoch
    assert len(result["history"]) == 3 and result["global_step"] == 3 * per_epoch
    cut = full.pruned
    assert cut["epoch"] == 1 and cut["global_step"] == per_epoch
    for name, site in prompt_sites(full.model).items():
        assert site.key_prompts.shape[0] == 2 and len(cut["kept"][name]) == 2
        scores = cut["scores"][name]
        assert sorted(scores, reverse=True)[:2] == sorted((scores[i] for i in cut["kept"][name]), reverse=True)
    # the cost and the counts are the kept prompts'
    direct = build_train_config(overrides={**TINY, "num_prompts": 2, "prune_keep": 1.0})
    from apt_ray.profile.cost import trial_cost

    assert result["updated_params"] == trial_cost(direct).updated_params
    assert result["additional_gmacs"] == pytest.approx(trial_cost(direct).additional_gmacs)

    # the rewind starts from the trained values of the kept rows (checkpoint after its first epoch: one step of each)
    ckpt = tmp_path / "full" / "checkpoints" / f"step_{2 * per_epoch:08d}"
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / METHOD_WEIGHTS))
    prompts = {k: v for k, v in weights.items() if k.endswith("key_prompts")}
    assert prompts and all(v.shape[0] == 2 for v in prompts.values())  # the checkpoint holds the kept rows only
    before = {k: v for k, v in load_file(str(tmp_path / "full" / "checkpoints" / f"step_{per_epoch:08d}" / METHOD_WEIGHTS)).items()
              if k.endswith("key_prompts")}
    assert all(v.shape[0] == 4 for v in before.values())
    for name, rows in trained.items():
        torch.testing.assert_close(rows, before[f"{name}.key_prompts"])

    # resumed in the middle of the rewind (after its first epoch): the same end as the uninterrupted run
    resumed = Trainer(cfg, LocalSession(tmp_path / "resumed", resume_from=ckpt))
    again = resumed.fit()
    assert resumed.pruned["kept"] == cut["kept"]
    assert again["global_step"] == result["global_step"]
    assert again["history"][-1]["train_loss"] == pytest.approx(result["history"][-1]["train_loss"], rel=1e-6)
    assert again["val_score"] == pytest.approx(result["val_score"])
    for (n1, p1), (n2, p2) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert n1 == n2 and torch.allclose(p1, p2, atol=1e-6), n1


def test_no_pruning_leaves_a_run_as_it_was(tmp_path: Path):
    """prune_keep=1 (the default): no scoring pass, no cut, no rewind epochs."""
    cfg = build_train_config(overrides={**TINY, "prune_keep": 1.0, "max_steps": 2, "output_dir": str(tmp_path)})
    trainer = Trainer(cfg, LocalSession(tmp_path))
    result = trainer.fit()
    assert trainer.pruned is None and len(result["history"]) == 1 and result["global_step"] == 2


# -- sweeps and the analysis ----------------------------------------------------------------------------------------

def test_prune_keep_is_a_grid_axis_and_budgeted_at_its_pruned_cost():
    from apt_ray.profile.cost import trial_cost
    from apt_ray.sweep.grid import grid_spec

    spec = grid_spec({"num_prompts": [8, 32], "prune_keep": [1.0, 0.25]}, name="prune-grid", model="tiny-meter",
                     method="kv_prompt", fixed={"epochs": 1})
    assert len(spec.initial_points) == 4
    cost = {(p["num_prompts"], p["prune_keep"]): trial_cost(spec.train_config(p)).additional_gmacs for p in spec.initial_points}
    assert cost[(32, 0.25)] == cost[(8, 1.0)] < cost[(32, 1.0)]


def test_a_pruned_configuration_is_never_merged_with_an_unpruned_one_of_the_same_cost():
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from apt_ray.analysis import plots, tables

    df = pd.DataFrame({"method": ["apt"] * 4, "num_prompts": [8, 32, 8, 32], "prune_keep": [1.0, 0.25, 1.0, 0.25],
                       "additional_gmacs": [0.001] * 4, "val_score": [50.0, 51.0, 49.0, 52.0], "seed": [0, 0, 1, 1]})
    groups = {key["prune_keep"]: sorted(part["num_prompts"]) for key, part in tables.configurations(df)}
    assert groups == {0.25: [32, 32], 1.0: [8, 8]}
    assert list(tables.pruned(df)) == [False, True, False, True]
    labels = plots.pareto(df, df.iloc[:0]).axes[0].get_legend_handles_labels()[1]
    assert labels == ["apt", "apt, pruned"]
