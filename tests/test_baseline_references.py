"""The prompt baselines against references written here, independently of apt_ray's attention code.

Each reference is plain torch (matrix products, a hand-written softmax attention and LayerNorm) fed with the
backbone's Linear / LayerNorm weights and the method's parameters; it never imports the site method classes'
forward logic nor ``site_attention``. Each test matches the site's output and the gradients with respect to the
method's parameters in float64 to 1e-10, and checks that the comparison would catch the prompts' values being
zeroed or doubled (by mutating what the module feeds the attention and seeing the match fail).
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from apt_ray import methods
from apt_ray.methods.deep_prompt import DeepPromptSite, fold
from apt_ray.methods.kv_prompt import KVPromptSite
from apt_ray.methods.prefix_encoder import PrefixEncoder, PrefixSite
from apt_ray.methods.spec import MethodSpec
from tests.helpers import tiny_batch, tiny_model

TOL = 1e-10
MUTATION_GAP = 1e-6  # a mutated module must miss the reference by far more than TOL


# ----------------------------------------------------------------------------- the references


def ref_linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return x @ lin.weight.T + lin.bias


def ref_layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, key_pad: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h) + mask) V per head; ``key_pad``: (B, N_k) with 1 = attend, 0 = padding."""
    b, nq, d = q.shape
    dh = d // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, dh).permute(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dh)
    if key_pad is not None:
        scores = scores.masked_fill(key_pad[:, None, None, :] == 0, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights @ split(v)).permute(0, 2, 1, 3).reshape(b, nq, d)


def extend_keys(key_pad: torch.Tensor | None, b: int, n_keys: int, extra: int) -> torch.Tensor:
    """The padding mask over real keys followed by ``extra`` always-visible prompt keys."""
    real = key_pad if key_pad is not None else torch.ones(b, n_keys, dtype=torch.long)
    return torch.cat([real, torch.ones(b, extra, dtype=real.dtype)], dim=1)


def site_output_ref(site, x: torch.Tensor, y: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, key_pad) -> torch.Tensor:
    """A site's output with key/value prompts ``kp``, ``vp`` (p x d, already in key/value space) appended after
    the real keys: ViLT returns ``ctx W_o``; METER's post-norm block ``LN(ctx W_o + x)``."""
    w_q, w_k, w_v, w_o = site.module.projections()
    b = x.shape[0]
    k = torch.cat([ref_linear(y, w_k), kp.expand(b, -1, -1)], dim=1)
    v = torch.cat([ref_linear(y, w_v), vp.expand(b, -1, -1)], dim=1)
    ctx = ref_attention(ref_linear(x, w_q), k, v, site.num_heads, extend_keys(key_pad, b, y.shape[1], kp.shape[0]))
    out = ref_linear(ctx, w_o)
    if hasattr(site.module, "output") and hasattr(site.module.output, "LayerNorm"):  # METER
        out = ref_layer_norm(out + x, site.module.output.LayerNorm)
    return out


# ------------------------------------------------------------------------------ apt_ray's side


def key_pad_of(n: int, b: int = 2) -> torch.Tensor:
    pad = torch.ones(b, n, dtype=torch.long)
    pad[0, n - 3:] = 0  # the first example has its last three keys padded
    return pad


def run_site(site, x: torch.Tensor, y: torch.Tensor, key_pad: torch.Tensor | None) -> torch.Tensor:
    """The site module's forward as its backbone calls it."""
    if site.module.__class__.__name__ == "ViltSiteAttention":
        additive = None
        if key_pad is not None:
            additive = (1.0 - key_pad[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return site.module(x, additive)[0]
    mask = None if key_pad is None else key_pad.bool()[:, None, None, :]
    return site.module(x, y, mask)


def site_inputs(site, seed: int = 0, nq: int = 6, nk: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, nq, site.hidden_size, generator=g, dtype=torch.float64)
    y = x if site.kind == "self" else torch.randn(2, nk, site.hidden_size, generator=g, dtype=torch.float64)
    return x, y


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def mutated(monkeypatch: pytest.MonkeyPatch, cls: type, change: Callable[[torch.Tensor, torch.Tensor], tuple]) -> None:
    """Make ``cls.extra_kv`` hand the attention ``change(k, v)`` instead of its keys and values."""
    original = cls.extra_kv

    def wrapped(self, x, y, site):
        k, v = original(self, x, y, site)
        return change(k, v)

    monkeypatch.setattr(cls, "extra_kv", wrapped)


MUTATIONS = {
    "values zeroed": lambda k, v: (k, 0 * v),
    "keys zeroed": lambda k, v: (0 * k, v),
    "doubled": lambda k, v: (2 * k, 2 * v),
}


def assert_mutations_caught(monkeypatch, cls: type, produce: Callable[[], torch.Tensor], reference: torch.Tensor) -> None:
    for name, change in MUTATIONS.items():
        with monkeypatch.context() as m:
            mutated(m, cls, change)
            with torch.no_grad():
                got = produce()
        assert max_diff(got, reference) > MUTATION_GAP, f"the comparison misses the mutation '{name}'"


def applied_double(name: str, spec: MethodSpec):
    """A tiny model with the method applied, then everything (method included) in float64 and eval mode."""
    model = tiny_model(name)
    applied = methods.apply(model, spec)
    model.double().eval()
    return model, applied


# --------------------------------------------------------------- (a) ViLT's deep prompt layout


def vilt_fused_qkv_ref(site, h: torch.Tensor, prompts: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
    """The authors' ViLT block: prompts appended to the block input before its LayerNorm, one fused qkv
    projection for all tokens, the prompts' queries dropped, real queries over real + prompt keys."""
    w_q, w_k, w_v, w_o = site.module.projections()
    norm = site.module.prompt_norm()
    b, n, d = h.shape
    tokens = torch.cat([h, prompts.expand(b, -1, -1)], dim=1)
    normed = ref_layer_norm(tokens, norm)
    fused_w = torch.cat([w_q.weight, w_k.weight, w_v.weight], dim=0)
    fused_b = torch.cat([w_q.bias, w_k.bias, w_v.bias], dim=0)
    qkv = normed @ fused_w.T + fused_b
    q, k, v = qkv.split(d, dim=-1)
    ctx = ref_attention(q[:, :n], k, v, site.num_heads, extend_keys(key_pad, b, n, prompts.shape[0]))
    return ref_linear(ctx, w_o)


def test_vilt_deep_prompt_matches_fused_qkv_reference(monkeypatch):
    model, applied = applied_double("tiny-vilt", MethodSpec(name="deep_prompt", num_prompts=5))
    assert applied.spec.sites == "all" and applied.spec.project_queries is True
    assert len(applied.sites) == model.backbone.num_layers
    site = applied.sites[1]
    method = site.module.site_methods[0]
    assert isinstance(method, DeepPromptSite)
    assert method.prompts.abs().max() <= math.sqrt(6 / (3 * 16 * 16 + site.hidden_size))  # VPT's uniform init
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, site.hidden_size, generator=g, dtype=torch.float64)  # the layer's input
    key_pad = key_pad_of(9)
    upstream = torch.randn(2, 9, site.hidden_size, generator=g, dtype=torch.float64)

    def ours() -> torch.Tensor:
        return run_site(site, site.module.prompt_norm()(h), None, key_pad)  # the layer norms its tokens, then calls the site

    got = ours()
    (got * upstream).sum().backward()
    p = method.prompts.detach().clone().requires_grad_(True)
    ref = vilt_fused_qkv_ref(site, h, p, key_pad)
    (ref * upstream).sum().backward()
    assert max_diff(got, ref) < TOL
    assert max_diff(method.prompts.grad, p.grad) < TOL and p.grad.abs().max() > 1e-6
    # the prompts matter, pass through the norm, and every mutation of what reaches the attention is seen
    with torch.no_grad():
        plain = vilt_fused_qkv_ref(site, h, p[:0], key_pad)
        unnormed = site_output_ref(site, site.module.prompt_norm()(h), site.module.prompt_norm()(h),
                                   ref_linear(p, site.module.projections()[1]), ref_linear(p, site.module.projections()[2]), key_pad)
    assert max_diff(got, plain) > MUTATION_GAP and max_diff(got, unnormed) > MUTATION_GAP
    assert_mutations_caught(monkeypatch, DeepPromptSite, ours, ref.detach())


def test_vilt_deep_prompt_projects_queries_of_the_prompts():
    """The fused-qkv layout's cost: W_q sees the prompts (output unused), after the norm."""
    model, applied = applied_double("tiny-vilt", MethodSpec(name="deep_prompt", num_prompts=5))
    site = applied.sites[0]
    seen: list[torch.Tensor] = []
    handle = site.module.projections()[0].register_forward_hook(lambda m, a, o: seen.append(a[0]))
    x, _ = site_inputs(site)
    with torch.no_grad():
        run_site(site, x, None, None)
    handle.remove()
    assert [t.shape[-2] for t in seen] == [x.shape[1], 5]
    normed = ref_layer_norm(site.module.site_methods[0].prompts, site.module.prompt_norm())
    assert max_diff(seen[1][0], normed) < TOL


# ---------------------------------------------------------- (b) METER's released layout (cross K/V)


@pytest.mark.parametrize("which", ["text", "image"])
def test_meter_deep_prompt_matches_released_cross_kv_reference(monkeypatch, which):
    model, applied = applied_double("tiny-meter", MethodSpec(name="deep_prompt", num_prompts=4))
    assert applied.spec.sites == "cross" and applied.spec.project_queries is False
    assert [s.kind for s in applied.sites] == ["cross"] * (2 * model.backbone.num_layers)
    site = next(s for s in applied.sites if s.stream == which and s.layer == 1)
    method = site.module.site_methods[0]
    assert site.module.prompt_norm() is None
    x, y = site_inputs(site)
    # text queries see all image keys; image queries see the text keys through the text padding mask
    key_pad = key_pad_of(y.shape[1]) if which == "image" else None
    upstream = torch.randn_like(x)
    w_q, w_k, w_v, _ = site.module.projections()
    calls: list[int] = []
    handle = w_q.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[-2]))

    def ours() -> torch.Tensor:
        return run_site(site, x, y, key_pad)

    got = ours()
    handle.remove()
    assert calls == [x.shape[1]]  # no query projection of the prompts
    (got * upstream).sum().backward()
    p = method.prompts.detach().clone().requires_grad_(True)
    ref = site_output_ref(site, x, y, ref_linear(p, w_k), ref_linear(p, w_v), key_pad)
    (ref * upstream).sum().backward()
    assert max_diff(got, ref) < TOL
    assert max_diff(method.prompts.grad, p.grad) < TOL and p.grad.abs().max() > 1e-6
    assert_mutations_caught(monkeypatch, DeepPromptSite, ours, ref.detach())


# ------------------------------------------------------------ (c) E2VPT key-value prompts


@pytest.mark.parametrize("backbone", ["tiny-vilt", "tiny-meter"])
@pytest.mark.parametrize("shared", [True, False])
def test_e2vpt_kv_prompts_match_reference(monkeypatch, backbone, shared):
    model, applied = applied_double(backbone, MethodSpec(name="kv_prompt", num_prompts=4, shared_kv=shared, num_visual_prompts=0))
    site = applied.sites[-1]
    assert site.kind == "self"
    method = site.module.site_methods[0]
    assert isinstance(method, KVPromptSite)
    x, y = site_inputs(site)
    key_pad = key_pad_of(x.shape[1])
    upstream = torch.randn_like(x)

    def ours() -> torch.Tensor:
        return run_site(site, x, y, key_pad)

    got = ours()
    (got * upstream).sum().backward()
    kp = method.key_prompts.detach().clone().requires_grad_(True)
    vp = kp if shared else method.value_prompts.detach().clone().requires_grad_(True)
    ref = site_output_ref(site, x, y, kp, vp, key_pad)
    (ref * upstream).sum().backward()
    assert max_diff(got, ref) < TOL
    assert max_diff(method.key_prompts.grad, kp.grad) < TOL and kp.grad.abs().max() > 1e-6
    if shared:
        assert method.value_prompts is None
    else:
        assert max_diff(method.value_prompts.grad, vp.grad) < TOL and vp.grad.abs().max() > 1e-6
    assert_mutations_caught(monkeypatch, KVPromptSite, ours, ref.detach())


# ------------------------------------------------------------------ (d) OFA-PT's prefix encoder


def prefix_ref(e, w1, b1, w2, b2, index: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Site ``index``'s key and value prefixes: columns [2 i d, (2 i + 1) d) and [(2 i + 1) d, (2 i + 2) d)."""
    out = torch.clamp(e @ w1.T + b1, min=0) @ w2.T + b2
    return out[:, 2 * index * d:(2 * index + 1) * d], out[:, (2 * index + 1) * d:(2 * index + 2) * d]


def test_ofa_prefix_encoder_matches_reference_before_and_after_folding(monkeypatch):
    p, hid = 3, 8
    model, applied = applied_double("tiny-meter", MethodSpec(name="deep_prompt", num_prompts=p, reparam_hidden=hid))
    encoder = model.method_modules["deep_prompt"]
    assert isinstance(encoder, PrefixEncoder)
    n_sites, d = len(applied.sites), model.backbone.hidden_size
    assert encoder.num_sites == n_sites == 2 * model.backbone.num_layers
    with torch.no_grad():
        encoder.net[2].weight.normal_(0, 0.3)
    index = 5
    site = applied.sites[index]
    method = site.module.site_methods[0]
    assert isinstance(method, PrefixSite) and method.index == index
    x, y = site_inputs(site)
    key_pad = key_pad_of(y.shape[1]) if site.stream == "image" else None
    upstream = torch.randn_like(x)

    def ours() -> torch.Tensor:
        return run_site(site, x, y, key_pad)

    got = ours()
    (got * upstream).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in
              (encoder.embedding, encoder.net[0].weight, encoder.net[0].bias, encoder.net[2].weight, encoder.net[2].bias)]
    kp, vp = prefix_ref(*leaves, index, d)
    ref = site_output_ref(site, x, y, kp, vp, key_pad)
    (ref * upstream).sum().backward()
    assert max_diff(got, ref) < TOL
    ours_grads = (encoder.embedding.grad, encoder.net[0].weight.grad, encoder.net[0].bias.grad,
                  encoder.net[2].weight.grad, encoder.net[2].bias.grad)
    for mine, theirs in zip(ours_grads, leaves):
        assert max_diff(mine, theirs.grad) < TOL and theirs.grad.abs().max() > 1e-8
    with torch.no_grad():  # another site's slice gives another output: the slicing is site-specific
        other = site_output_ref(site, x, y, *prefix_ref(*leaves, index + 1, d), key_pad)
    assert max_diff(got, other) > MUTATION_GAP
    assert_mutations_caught(monkeypatch, PrefixSite, ours, ref.detach())

    # the whole model, eval mode: folding keeps the output and removes the encoder and its hooks
    batch = {k: v if k != "pixel_values" else v.double() for k, v in tiny_batch("tiny-meter").items()}
    hooks_before = len(model.backbone._forward_pre_hooks) + len(model.backbone._forward_hooks)
    with torch.no_grad():
        before = model(**batch)
        assert fold(model) == n_sites
        after = model(**batch)
    assert max_diff(before, after) < TOL
    assert "deep_prompt" not in model.method_modules
    assert not any(isinstance(m, PrefixEncoder) for m in model.modules())
    assert len(model.backbone._forward_pre_hooks) + len(model.backbone._forward_hooks) == hooks_before - 2
    assert sum(t.numel() for t in model.method_parameters()) == n_sites * 2 * p * d

    # after folding: fixed prefixes equal to the encoder's output, the same site output, their own gradients
    kp0, vp0 = (t.detach().clone().requires_grad_(True) for t in (kp, vp))
    assert max_diff(method.key_prefix, kp0) < TOL and max_diff(method.value_prefix, vp0) < TOL
    folded = ours()
    (folded * upstream).sum().backward()
    ref = site_output_ref(site, x, y, kp0, vp0, key_pad)
    (ref * upstream).sum().backward()
    assert max_diff(folded, ref) < TOL
    assert max_diff(method.key_prefix.grad, kp0.grad) < TOL and max_diff(method.value_prefix.grad, vp0.grad) < TOL
    assert_mutations_caught(monkeypatch, PrefixSite, ours, ref.detach())
