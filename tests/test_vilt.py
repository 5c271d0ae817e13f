"""The wrapped ViLT is transformers' ViLT: same outputs, same checkpoints."""

from __future__ import annotations

import torch
from transformers import ViltModel

from apt_ray import methods
from apt_ray.methods.spec import MethodSpec
from apt_ray.models.presets import build_backbone, get_preset
from apt_ray.models.vilt import ViltBackbone
from tests.helpers import tiny_batch


def _forward(module, batch, seed=0):
    torch.manual_seed(seed)  # ViLT shuffles patches with torch.multinomial
    with torch.no_grad():
        return module(**batch)


def test_wrapped_vilt_equals_transformers_vilt():
    config = get_preset("tiny-vilt").make_config(64)
    torch.manual_seed(0)
    reference = ViltModel(config).eval()
    ours = ViltBackbone(config)
    ours.vilt.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    batch = tiny_batch()
    ref = _forward(reference, batch).last_hidden_state
    torch.manual_seed(0)
    with torch.no_grad():
        got_out = ours.encode(**batch)
    got = torch.cat([got_out.text_states, got_out.image_states], dim=1)
    assert (ref - got).abs().max() < 1e-5
    # a method with its prompts zeroed is a no-op, too
    from tests.helpers import tiny_model

    model = tiny_model()
    model.backbone.vilt.load_state_dict(reference.state_dict())
    applied = methods.apply(model, MethodSpec(name="apt", num_prompts=3, train_extras=[]))
    with torch.no_grad():
        for s in applied.sites:
            s.module.site_methods[0].prompts.zero_()
    torch.manual_seed(0)
    with torch.no_grad():
        seq = model.backbone.vilt(**batch).last_hidden_state
    assert (seq - ref).abs().max() < 1e-5
    # the learnable [CLS] starts as the embedding of the [CLS] id, so on texts that begin with it nothing changes
    # until it trains; it replaces the first token whatever that token is
    cls_id = int(batch["input_ids"][0, 0])
    model = tiny_model()
    model.backbone.vilt.load_state_dict(reference.state_dict())
    model.cls_token_id = cls_id
    methods.apply(model, MethodSpec(name="head_only"))
    starts = {**batch, "input_ids": batch["input_ids"].clone()}
    starts["input_ids"][:, 0] = cls_id
    with torch.no_grad():
        torch.manual_seed(0)
        expected = reference(**starts).last_hidden_state
        torch.manual_seed(0)
        assert (model.backbone.vilt(**starts).last_hidden_state - expected).abs().max() < 1e-5
        model.extras["cls_token"].add_(torch.randn_like(model.extras["cls_token"]))  # (a constant shift would vanish in the LayerNorm)
        torch.manual_seed(0)
        assert (model.backbone.vilt(**starts).last_hidden_state - expected).abs().max() > 1e-2


def test_save_pretrained_reloads_identically(tmp_path):
    torch.manual_seed(0)
    b = build_backbone("tiny-vilt", vocab_size=64).eval()
    b.save_pretrained(tmp_path / "vilt")
    again = build_backbone("tiny-vilt", checkpoint=tmp_path / "vilt").eval()
    batch = tiny_batch()
    assert torch.equal(_forward(b, batch), _forward(again, batch))
    sd1, sd2 = b.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # state-dict keys are transformers' own: a plain ViltModel loads the directory strictly
    plain = ViltModel.from_pretrained(tmp_path / "vilt")
    assert set(plain.state_dict()) == {k.removeprefix("vilt.") for k in sd1}


def test_sites_of_vilt():
    b = build_backbone("tiny-vilt", vocab_size=64)
    sites = b.attention_sites()
    assert [s.layer for s in sites] == list(range(b.num_layers))
    assert all(s.kind == "self" and s.stream == s.key_stream == "joint" for s in sites)
