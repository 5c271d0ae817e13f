"""Method correctness: the math of APT and deep prompts, freezing, parameter counts, placement."""

from __future__ import annotations

import math

import pytest
import torch

from apt_ray import methods
from apt_ray.errors import UserError
from apt_ray.methods.apt import APTSite
from apt_ray.methods.deep_prompt import DeepPromptSite, fold
from apt_ray.methods.kv_prompt import KVPromptSite, VisualPrompts
from apt_ray.methods.prefix_encoder import PrefixEncoder, PrefixSite
from apt_ray.methods.sites import resolve_layers
from apt_ray.methods.spec import METHOD_NAMES, MethodSpec
from apt_ray.models.attention import site_attention
from tests.helpers import tiny_batch, tiny_model

BACKBONES = ["tiny-vilt", "tiny-meter"]


def _site_inputs(site, n: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, site.hidden_size, generator=g)
    return x


def test_deep_prompt_decomposition_identity():
    """Attn(Q,[K;Kp],[V;Vp]) = (1-lam) Attn(Q,K,V) + lam Attn(Q,Kp,Vp), per query and head."""
    model = tiny_model("tiny-vilt")
    site = model.backbone.attention_sites()[1]
    torch.manual_seed(3)
    method = DeepPromptSite(site.hidden_size, 5, project_queries=False)
    site.module.attach(method)
    x = _site_inputs(site)
    w_q, w_k, w_v, w_o = site.module.projections()
    h = site.num_heads
    dh = site.hidden_size // h

    def heads(t):
        return t.view(t.shape[0], t.shape[1], h, dh).transpose(1, 2)

    with torch.no_grad():
        joint = site_attention(site.module, w_q, w_k, w_v, w_o, x, x, h)
        q, k, v = heads(w_q(x)), heads(w_k(x)), heads(w_v(x))
        kp_, vp_ = method.extra_kv(x, x, site.module)
        kp, vp = heads(kp_.expand(2, -1, -1)), heads(vp_.expand(2, -1, -1))
        sx = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(dh)).sum(-1, keepdim=True)
        sp = torch.exp(q @ kp.transpose(-1, -2) / math.sqrt(dh)).sum(-1, keepdim=True)
        lam = sp / (sx + sp)
        attn = lambda kk, vv: torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(dh), -1) @ vv  # noqa: E731
        mixed = (1 - lam) * attn(k, v) + lam * attn(kp, vp)
        decomposed = w_o(mixed.transpose(1, 2).reshape(2, -1, site.hidden_size))
        plain = w_o(attn(k, v).transpose(1, 2).reshape(2, -1, site.hidden_size))
    assert (joint - decomposed).abs().max().item() < 1e-5
    assert (joint - plain).abs().max().item() > 1e-4  # the prompts do change the output


def _apt_reference(x, out, p, a, b, s):
    keys = p + (p @ a) @ b
    scores = torch.relu(x @ keys.T)
    w = scores.max(dim=-1, keepdim=True).values
    return (out + w * (scores @ p)) * math.exp(s)


def test_apt_matches_reference_formula_and_rank0_at_init():
    torch.manual_seed(0)
    d = 16
    m = APTSite(d, num_prompts=6, rank=3)
    x, out = torch.randn(2, 5, d), torch.randn(2, 5, d)
    with torch.no_grad():
        at_init = m.transform_output(x, out)
        rank0 = _apt_reference(x, out, m.prompts, torch.zeros(d, 0), torch.zeros(0, d), 0.0)
        assert torch.equal(m.lora_b, torch.zeros_like(m.lora_b))
        assert (at_init - rank0).abs().max() < 1e-6
        m.lora_b.normal_()
        m.log_scale.fill_(0.3)
        trained = m.transform_output(x, out)
        ref = _apt_reference(x, out, m.prompts, m.lora_a, m.lora_b, 0.3)
        assert (trained - ref).abs().max() < 1e-5
        assert (trained - at_init).abs().max() > 1e-3


def test_apt_weight_is_detached():
    torch.manual_seed(0)
    m = APTSite(8, 4, 2)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(1, 3, 8)
    m.transform_output(x, torch.zeros(1, 3, 8)).sum().backward()
    g_full = m.prompts.grad.clone()
    # Same computation with w recomputed as a constant: identical gradient means w carried none.
    m.zero_grad()
    keys = m.prompt_keys()
    s = torch.relu(x @ keys.T)
    w = s.max(-1, keepdim=True).values.detach()
    ((w * (s @ m.prompts)) * m.log_scale.exp()).sum().backward()
    assert torch.allclose(g_full, m.prompts.grad, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_frozen_backbone_gets_no_gradient(backbone, name):
    model = tiny_model(backbone)
    backbone_params = dict(model.backbone.named_parameters())
    before = {n for n, p in backbone_params.items()}
    spec = MethodSpec(name=name, num_prompts=3, rank=2, depth=2)
    applied = methods.apply(model, spec)
    model.train()
    logits = model(**tiny_batch(backbone))
    logits.sum().backward()
    method_params = model.method_parameters()
    if name in ("linear_probe", "head_only"):
        assert method_params == []
    else:
        # every method parameter is in the graph (zero-initialised factors may get a zero gradient at init)
        assert method_params and all(p.grad is not None for p in method_params)
        assert any(p.grad.abs().sum() > 0 for p in method_params)
    # besides the method, only the backbone extras it trains (the authors' set by default: poolers, token types)
    parts = model.backbone.extra_modules()
    extra_ids = {id(p) for e in applied.extras if e in parts for m in parts[e] for p in m.parameters()}
    for n in before:
        p = backbone_params[n]
        if name == "full" or id(p) in extra_ids:
            assert p.requires_grad, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert all(p.grad is not None for p in model.head_parameters())
    assert applied.analytic_params() == sum(p.numel() for p in method_params)


def _image_encoder_depth(backbone) -> int:
    """Layers of the encoder that carries the image tokens, read from the config (ViLT: joint; METER: CLIP ViT)."""
    vision = getattr(backbone.config, "vision_config", None)
    return int(vision["num_hidden_layers"]) if isinstance(vision, dict) else backbone.config.num_hidden_layers


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(
    "kw",
    [dict(depth=None), dict(depth=1, placement="top"), dict(depth=2, placement="bottom"), dict(layers=[0, 2])],
)
@pytest.mark.parametrize("name", ["apt", "deep_prompt", "kv_prompt", "lora", "adapter"])
def test_parameter_counts_equal_closed_forms(backbone, kw, name):
    model = tiny_model(backbone)
    p, r = 5, 3
    spec = MethodSpec(name=name, num_prompts=p, rank=r, adapter_dim=4, num_visual_prompts=2, **kw)
    applied = methods.apply(model, spec)
    d = model.backbone.hidden_size
    n_layers = len(applied.layers)
    sites_per_layer = len(model.backbone.attention_sites()) // model.backbone.num_layers
    n_sites = n_layers * sites_per_layer
    self_sites = sum(1 for s in applied.sites if s.kind == "self")
    # deep_prompt follows the backbone's released layout: METER's cross-attention sites only (one per stream)
    deep_sites = n_layers * (2 if backbone == "tiny-meter" else 1)
    expected = {
        "apt": n_sites * (p * d + 2 * d * r + int(applied.spec.train_scale)),  # METER's released code freezes s
        "deep_prompt": deep_sites * p * d,
        "kv_prompt": self_sites * p * d + 2 * model.backbone.input_prompt_dim * _image_encoder_depth(model.backbone),
        "lora": n_sites * 4 * d * r,
        "adapter": (n_sites + n_layers * len({s.stream for s in applied.sites})) * (2 * d * 4 + 4 + d),
    }[name]
    if name == "deep_prompt":
        assert len(applied.sites) == deep_sites
        assert {s.kind for s in applied.sites} == ({"cross"} if backbone == "tiny-meter" else {"self"})
    actual = sum(x.numel() for x in model.method_parameters())
    assert actual == expected == applied.analytic_params()


@pytest.mark.parametrize(
    "backbone, kw, kinds, per_layer, project",
    [
        ("tiny-meter", {}, {"cross"}, 2, False),  # the APT authors' released METER code
        ("tiny-meter", dict(sites="all"), {"self", "cross"}, 4, False),
        ("tiny-meter", dict(sites="self", project_queries=True), {"self"}, 2, True),
        ("tiny-vilt", {}, {"self"}, 1, True),  # their ViLT code: fused qkv, queries projected
    ],
)
def test_deep_prompt_layouts(backbone, kw, kinds, per_layer, project):
    model = tiny_model(backbone)
    p = 3
    applied = methods.apply(model, MethodSpec(name="deep_prompt", num_prompts=p, **kw))
    n = model.backbone.num_layers
    assert {s.kind for s in applied.sites} == kinds and len(applied.sites) == per_layer * n
    assert applied.spec.project_queries is project
    assert all(s.module.site_methods[0].project_queries is project for s in applied.sites)
    d = model.backbone.hidden_size
    assert sum(x.numel() for x in model.method_parameters()) == per_layer * n * p * d == applied.analytic_params()
    # closed-form cost: (2 or 3) d^2 p of projections + 2 N_q p d of attention per site
    site = applied.sites[0]
    assert applied.site_macs(site, 10, 12) == (3 if project else 2) * d * d * p + 2 * 10 * p * d


def test_deep_prompt_init_is_vpt_uniform():
    model = tiny_model()
    applied = methods.apply(model, MethodSpec(name="deep_prompt", num_prompts=64))
    d = model.backbone.hidden_size
    bound = math.sqrt(6 / (3 * 16 * 16 + d))
    values = torch.cat([s.module.site_methods[0].prompts.detach().flatten() for s in applied.sites])
    assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound
    assert abs(values.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert math.isclose(math.sqrt(6 / (3 * 16 * 16 + 768)), 0.0625)


def test_cross_sites_on_vilt_are_refused():
    with pytest.raises(UserError, match="no cross-attention sites"):
        methods.apply(tiny_model("tiny-vilt"), MethodSpec(name="deep_prompt", sites="cross"))


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("deep", [True, False])
def test_kv_prompt_counts(backbone, shared, deep):
    model = tiny_model(backbone)
    p, v = 4, 3
    applied = methods.apply(model, MethodSpec(name="kv_prompt", num_prompts=p, num_visual_prompts=v, shared_kv=shared, deep_visual_prompts=deep))
    d, d_in = model.backbone.hidden_size, model.backbone.input_prompt_dim
    assert all(s.kind == "self" for s in applied.sites)
    kv = len(applied.sites) * (1 if shared else 2) * p * d
    visual = v * d_in * (_image_encoder_depth(model.backbone) if deep else 1)
    assert sum(x.numel() for x in model.method_parameters()) == kv + visual == applied.analytic_params()
    method = applied.sites[0].module.site_methods[0]
    assert (method.value_prompts is None) is shared
    # the visual prompts cost the same deep or shallow: same token count at every layer
    shallow = methods.apply(tiny_model(backbone), MethodSpec(name="kv_prompt", num_prompts=p, num_visual_prompts=v, deep_visual_prompts=False))
    assert applied.global_macs(24, 65) == shallow.global_macs(24, 65) > 0


def test_kv_prompt_init_is_e2vpt_kaiming():
    """E2VPT's kaiming_uniform_(a=0, fan_in, leaky_relu) on its (heads, p, d_h) layout: bound sqrt(6 / (p d_h))."""
    model = tiny_model()
    p = 32
    applied = methods.apply(model, MethodSpec(name="kv_prompt", num_prompts=p, num_visual_prompts=0))
    site = applied.sites[0]
    bound = math.sqrt(6 / (p * site.hidden_size // site.num_heads))
    values = torch.cat([s.module.site_methods[0].key_prompts.detach().flatten() for s in applied.sites])
    assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("backbone", BACKBONES)
def test_deep_visual_prompts_replace_each_layers_prompt_tokens(backbone):
    """VPT-deep: layer k reads its own visual prompts at the last v positions; whatever layer k-1 wrote there
    never reaches it. With shallow prompts the same positions carry layer k-1's outputs on."""
    v, k = 3, 1
    model = tiny_model(backbone)
    methods.apply(model, MethodSpec(name="kv_prompt", num_prompts=2, num_visual_prompts=v))
    model.eval()
    visual = model.method_modules["kv_prompt"]
    assert isinstance(visual, VisualPrompts) and len(visual.sets) == _image_encoder_depth(model.backbone)
    layers = model.backbone.image_encoder_layers()
    batch = tiny_batch(backbone)

    def run() -> torch.Tensor:
        torch.manual_seed(0)  # ViLT samples patches at random
        with torch.no_grad():
            return model(**batch)

    seen: dict[str, torch.Tensor] = {}
    h_in = layers[k].register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("in", _layer_input(a, kw)), with_kwargs=True)
    h_out = layers[k - 1].register_forward_hook(lambda m, a, o: seen.__setitem__("prev", _layer_output(o)))
    base = run()
    h_in.remove()
    h_out.remove()
    assert torch.equal(seen["in"][:, -v:], visual.sets[k].detach().expand(2, -1, -1))
    assert (seen["prev"][:, -v:] - seen["in"][:, -v:]).abs().max() > 1e-3  # layer k-1's prompt outputs were discarded

    # changing layer k's prompts changes the output
    # (a random change: a constant shift of a token would vanish in the pre-norm layers' LayerNorm)
    saved = visual.sets[k].detach().clone()
    with torch.no_grad():
        visual.sets[k].add_(torch.randn(saved.shape, generator=torch.Generator().manual_seed(1)))
    assert (run() - base).abs().max() > 1e-6
    with torch.no_grad():
        visual.sets[k].copy_(saved)
    assert torch.allclose(run(), base, atol=1e-6)

    def scramble(m, a, out):
        h = _layer_output(out).clone()
        h[:, -v:] = 100.0
        return (h, *out[1:]) if isinstance(out, tuple) else h

    # what layer k-1 writes at the prompt positions does not reach layer k ...
    handle = layers[k - 1].register_forward_hook(scramble)
    assert torch.equal(run(), base)
    handle.remove()
    # ... while with shallow (input-only) prompts it does
    shallow = tiny_model(backbone)
    methods.apply(shallow, MethodSpec(name="kv_prompt", num_prompts=2, num_visual_prompts=v, deep_visual_prompts=False))
    shallow.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        ref = shallow(**batch)
    handle = shallow.backbone.image_encoder_layers()[k - 1].register_forward_hook(scramble)
    torch.manual_seed(0)
    with torch.no_grad():
        assert (shallow(**batch) - ref).abs().max() > 1e-6
    handle.remove()


def test_full_and_linear_probe_counts():
    model = tiny_model()
    total = sum(p.numel() for p in model.backbone.parameters())
    assert methods.apply(model, MethodSpec(name="full")).analytic_params() == total
    assert sum(p.numel() for p in model.method_parameters()) == total
    for name in ("linear_probe", "head_only"):
        probe = tiny_model()
        methods.apply(probe, MethodSpec(name=name))
        assert probe.method_parameters() == []


def test_linear_probe_is_one_linear_layer_and_head_only_keeps_the_mlp():
    """The linear probe's logits are an affine map of the frozen pooled features (one Linear, nothing else);
    head_only trains the MLP head every other method trains."""
    probe, mlp = tiny_model(), tiny_model()
    methods.apply(probe, MethodSpec(name="linear_probe"))
    methods.apply(mlp, MethodSpec(name="head_only"))
    assert isinstance(probe.head.net, torch.nn.Linear)
    assert probe.head.net.in_features == probe.backbone.pooled_size
    trainable = [p for p in probe.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == (probe.backbone.pooled_size + 1) * probe.head.num_answers
    assert isinstance(mlp.head.net, torch.nn.Sequential) and len(mlp.head.net) == 4
    probe.eval()
    batch = tiny_batch()
    pooled = probe.backbone(**batch)
    logits = probe(**batch)
    assert torch.allclose(logits, pooled @ probe.head.net.weight.T + probe.head.net.bias, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_reparameterised_prompts_fold_exactly(backbone):
    model = tiny_model(backbone)
    p, h = 4, 8
    applied = methods.apply(model, MethodSpec(name="deep_prompt", num_prompts=p, reparam_hidden=h, depth=2))
    n, d = len(applied.sites), model.backbone.hidden_size
    encoder = model.method_modules["deep_prompt"]
    assert isinstance(encoder, PrefixEncoder) and encoder.num_sites == n
    assert all(isinstance(s.module.site_methods[0], PrefixSite) for s in applied.sites)
    expected = p * d + d * h + h + h * 2 * d * n + 2 * d * n
    assert sum(x.numel() for x in model.method_parameters()) == expected == applied.analytic_params()
    assert applied.global_macs(24, 65) == p * (d * h + h * 2 * d * n)
    assert applied.site_macs(applied.sites[0], 10, 12) == 2 * 10 * p * d
    batch = tiny_batch(backbone)
    model.eval()
    with torch.no_grad():
        encoder.net[2].weight.normal_()  # make the encoder do something
        torch.manual_seed(0)
        before = model(**batch)
        assert fold(model) == n
        torch.manual_seed(0)
        after = model(**batch)
        assert fold(model) == 0
    assert (before - after).abs().max() < 1e-5
    assert "deep_prompt" not in model.method_modules
    assert not any(isinstance(m, PrefixEncoder) for m in model.modules())
    assert sum(x.numel() for x in model.method_parameters()) == n * 2 * p * d


@pytest.mark.parametrize("backbone", BACKBONES)
def test_prefix_encoder_runs_once_per_forward_and_trains(backbone):
    model = tiny_model(backbone)
    methods.apply(model, MethodSpec(name="deep_prompt", num_prompts=3, reparam_hidden=8))
    encoder = model.method_modules["deep_prompt"]
    calls = []
    handle = encoder.net.register_forward_hook(lambda m, a, o: calls.append(1))
    model.train()
    model(**tiny_batch(backbone)).sum().backward()
    handle.remove()
    assert len(calls) == 1 and encoder._cache is None  # computed once, dropped after the forward
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    # dropout (OFA-PT: 0.2) acts on the emitted prefixes in training mode only
    assert encoder.dropout.p == 0.2
    with torch.no_grad():
        assert not torch.equal(encoder(), encoder.raw())
        encoder.eval()
        assert torch.equal(encoder(), encoder.raw())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_placement_picks_layers(backbone):
    model = tiny_model(backbone)
    n = model.backbone.num_layers
    assert resolve_layers(n, 2, "bottom") == [0, 1]
    assert resolve_layers(n, 2, "top") == [n - 2, n - 1]
    assert resolve_layers(n, None, "top") == list(range(n))
    applied = methods.apply(model, MethodSpec(name="apt", depth=1, placement="top"))
    assert {s.layer for s in applied.sites} == {n - 1}
    carrying = [s.name for s in model.backbone.attention_sites() if len(s.module.site_methods)]
    assert carrying == [s.name for s in applied.sites]
    per_layer = len(model.backbone.attention_sites()) // n
    assert len(applied.sites) == per_layer


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(depth=99), "depth 99"),
        (dict(layers=[0, 99]), "out of range"),
        (dict(rank=10_000), "rank 10000"),
    ],
)
def test_backbone_dependent_bounds_are_refused(kw, match):
    with pytest.raises(UserError, match=match):
        methods.apply(tiny_model(), MethodSpec(name="apt", **kw))


def test_method_changes_output_only_through_its_parameters():
    """APT at init is not a no-op (prompts diffuse), but with zero prompts it is."""
    model = tiny_model()
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        base = model(**batch)
        methods.apply(model, MethodSpec(name="apt", num_prompts=4, train_extras=[]))  # no learnable [CLS] either
        with_apt = model(**batch)
        for m in model.modules():
            if isinstance(m, APTSite):
                m.prompts.zero_()
        zeroed = model(**batch)
    assert (base - with_apt).abs().max() > 0
    assert (base - zeroed).abs().max() < 1e-5
