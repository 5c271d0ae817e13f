"""METER backbone: sites, forward, masking, save/load, official checkpoint conversion."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apt_ray.errors import UserError
from apt_ray.methods.sites import SiteMethod
from apt_ray.models.meter import MeterBackbone, MeterConfig, meter_clip16_roberta_config, tiny_meter_config
from apt_ray.models.meter_convert import load_meter_checkpoint

VOCAB, PAD, TEXT_LEN, BATCH = 97, 0, 12, 3


@pytest.fixture(scope="module")
def config() -> MeterConfig:
    return tiny_meter_config(vocab_size=VOCAB, pad_token_id=PAD, num_fusion_layers=2, max_text_len=TEXT_LEN)


@pytest.fixture()
def model(config: MeterConfig) -> MeterBackbone:
    torch.manual_seed(0)
    return MeterBackbone(config).eval()


def make_batch(config: MeterConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, TEXT_LEN), generator=g)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = PAD
    pixels = torch.randn(BATCH, 3, config.image_size, config.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


# ------------------------------------------------------------------ interface


def test_sites_four_per_fusion_layer(model: MeterBackbone, config: MeterConfig) -> None:
    sites = model.attention_sites()
    assert len(sites) == 4 * config.num_fusion_layers == 4 * model.num_layers
    expected = []
    for i in range(config.num_fusion_layers):
        expected += [(i, "text", "self", "text"), (i, "text", "cross", "image"),
                     (i, "image", "self", "image"), (i, "image", "cross", "text")]
    assert [(s.layer, s.stream, s.kind, s.key_stream) for s in sites] == expected
    assert sites[0].name == "layer0.text.self" and sites[-1].name == f"layer{config.num_fusion_layers - 1}.image.cross"
    assert len({id(s.module) for s in sites}) == len(sites)
    layer = model.cross_modal_image_layers[1].crossattention
    assert sites[7].module is layer
    assert layer.projections() == (layer.self.query, layer.self.key, layer.self.value, layer.output.dense)
    assert all(s.hidden_size == config.hidden_size and s.num_heads == config.num_attention_heads for s in sites)
    ffn = model.ffn_sites()
    assert [(f.layer, f.stream) for f in ffn] == [(i, s) for i in range(config.num_fusion_layers) for s in ("text", "image")]
    assert ffn[1].linear is model.cross_modal_image_layers[0].output.dense
    assert model.family == "meter" and model.pooled_size == 2 * config.hidden_size


def test_forward_shapes_and_padding_mask(model: MeterBackbone, config: MeterConfig) -> None:
    batch = make_batch(config)
    with torch.no_grad():
        out = model.encode(**batch)
        pooled = model(**batch)
    n_img = config.num_image_tokens
    assert pooled.shape == (BATCH, 2 * config.hidden_size)
    assert out.text_states.shape == (BATCH, TEXT_LEN, config.hidden_size)
    assert out.image_states.shape == (BATCH, n_img, config.hidden_size)
    assert torch.equal(out.pooled, pooled)
    # change the ids under the padding: nothing that may not see them changes
    changed = dict(batch)
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = 5
    changed["input_ids"] = ids
    with torch.no_grad():
        out2 = model.encode(**changed)
    torch.testing.assert_close(out2.pooled, out.pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(out2.image_states, out.image_states, rtol=0, atol=1e-5)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out2.text_states[keep], out.text_states[keep], rtol=0, atol=1e-5)


def test_image_prompts_extend_image_stream(model: MeterBackbone, config: MeterConfig) -> None:
    batch = make_batch(config)
    prompts = nn.Parameter(torch.randn(3, model.input_prompt_dim))
    n_params = sum(1 for _ in model.parameters())
    model.set_image_prompts(prompts)
    assert model.num_image_prompts == 3 and sum(1 for _ in model.parameters()) == n_params
    assert model.stream_lengths(TEXT_LEN, config.num_image_tokens) == {"text": TEXT_LEN, "image": config.num_image_tokens + 3}
    out = model.encode(**batch)
    assert out.image_states.shape[1] == config.num_image_tokens + 3
    out.pooled.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    model.set_image_prompts(None)
    assert model.num_image_prompts == 0
    with pytest.raises(UserError):
        model.set_image_prompts(nn.Parameter(torch.randn(3, model.input_prompt_dim + 1)))


class AddConstant(SiteMethod):
    """Adds a fixed vector (not uniform across features, which the following LayerNorm would cancel)."""

    def transform_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + torch.linspace(-1.0, 1.0, out.shape[-1])


def test_site_method_hook(model: MeterBackbone, config: MeterConfig) -> None:
    batch = make_batch(config)
    with torch.no_grad():
        base = model(**batch)
        site = model.attention_sites()[3]  # layer0.image.cross
        site.module.attach(AddConstant())
        hooked = model(**batch)
        site.module.detach_all()
        again = model(**batch)
    assert not torch.allclose(hooked, base)
    assert torch.equal(again, base)


class ExtraKV(SiteMethod):
    """Two extra keys/values (deep-prompt style) in the projected space."""

    def extra_kv(self, x: torch.Tensor, y: torch.Tensor, site) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        g = torch.Generator().manual_seed(3)
        return torch.randn(1, 2, x.shape[-1], generator=g), torch.randn(1, 2, x.shape[-1], generator=g)


def test_extra_kv_on_masked_sites(model: MeterBackbone, config: MeterConfig) -> None:
    batch = make_batch(config)
    sites = model.attention_sites()
    with torch.no_grad():
        base = model(**batch)
        for site in sites:  # text self and image cross attend to padded text keys
            site.module.attach(ExtraKV())
        prompted = model(**batch)
        for site in sites:
            site.module.detach_all()
    assert torch.isfinite(prompted).all() and not torch.allclose(prompted, base)
    with pytest.raises(UserError, match="images"):
        model(batch["input_ids"], batch["attention_mask"], torch.zeros(1, 3, 32, 32))
    too_long = torch.ones(1, config.text_config["max_position_embeddings"], dtype=torch.long)
    with pytest.raises(UserError, match="max_text_len"):
        model(too_long, too_long, batch["pixel_values"][:1])


def test_save_and_reload(model: MeterBackbone, config: MeterConfig, tmp_path: Path) -> None:
    batch = make_batch(config)
    model.attention_sites()[0].module.attach(AddConstant())  # method weights are not part of the backbone file
    model.save_pretrained(tmp_path / "m")
    model.attention_sites()[0].module.detach_all()
    loaded = MeterBackbone.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.to_dict() == model.config.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(**batch), model(**batch))
    with pytest.raises(UserError):
        MeterBackbone.from_pretrained(tmp_path / "nowhere")


def _count_cpu_attention() -> None:
    """Torch's flop counter knows only the CUDA attention kernels; add the CPU one (idempotent)."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op)(
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
        )


def test_analytic_macs_match_measured(model: MeterBackbone, config: MeterConfig) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    batch = make_batch(config)
    model.set_image_prompts(nn.Parameter(torch.randn(2, model.input_prompt_dim)))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    model.set_image_prompts(None)
    measured = counter.get_total_flops() // 2 // BATCH  # one multiply-add = one FLOP
    assert model.analytic_macs(TEXT_LEN, config.num_image_tokens, 2) == measured


def test_meta_device_build_and_paper_shapes() -> None:
    cfg = meter_clip16_roberta_config()
    assert cfg.num_image_tokens == 577 and cfg.max_text_len == 50
    with torch.device("meta"):
        big = MeterBackbone(cfg)
    assert len(big.attention_sites()) == 24 and big.stream_lengths(50, 577) == {"text": 50, "image": 577}
    assert big.cross_modal_text_layers[0].attention.self.query.weight.is_meta


# ---------------------------------------------------- official checkpoint layout


def official_state_dict(cfg: MeterConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """METER's checkpoint names, listed by hand from the METER repository's modules."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.vision_config, cfg.text_config
    W, P, H, T = v["hidden_size"], v["patch_size"], cfg.hidden_size, t["hidden_size"]
    grid = cfg.image_size // P
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, *shape: int) -> None:
        sd[name] = torch.randn(*shape, generator=g) * 0.1

    def norm(name: str, d: int) -> None:
        sd[name + ".weight"] = 1 + torch.randn(d, generator=g) * 0.1
        sd[name + ".bias"] = torch.randn(d, generator=g) * 0.1

    def linear(name: str, d_out: int, d_in: int) -> None:
        put(name + ".weight", d_out, d_in)
        put(name + ".bias", d_out)

    # CLIP vision tower (OpenAI layout)
    put("vit_model.visual.conv1.weight", W, 3, P, P)
    put("vit_model.visual.class_embedding", W)
    put("vit_model.visual.positional_embedding", grid * grid + 1, W)
    norm("vit_model.visual.ln_pre", W)
    for i in range(v["num_hidden_layers"]):
        b = f"vit_model.visual.transformer.resblocks.{i}"
        put(f"{b}.attn.in_proj_weight", 3 * W, W)
        put(f"{b}.attn.in_proj_bias", 3 * W)
        linear(f"{b}.attn.out_proj", W, W)
        norm(f"{b}.ln_1", W)
        linear(f"{b}.mlp.c_fc", v["intermediate_size"], W)
        linear(f"{b}.mlp.c_proj", W, v["intermediate_size"])
        norm(f"{b}.ln_2", W)
    norm("vit_model.visual.ln_post", W)
    put("vit_model.positional_embedding", 77, 512)  # CLIP text-tower leftovers in METER's wrapper
    norm("vit_model.ln_final", 512)
    # RoBERTa text encoder (transformers layout, pooler included)
    e = "text_transformer.embeddings"
    put(f"{e}.word_embeddings.weight", t["vocab_size"], T)
    put(f"{e}.position_embeddings.weight", t["max_position_embeddings"], T)
    put(f"{e}.token_type_embeddings.weight", t["type_vocab_size"], T)
    norm(f"{e}.LayerNorm", T)
    sd[f"{e}.position_ids"] = torch.arange(t["max_position_embeddings"])[None]
    for i in range(t["num_hidden_layers"]):
        b = f"text_transformer.encoder.layer.{i}"
        for n in ("query", "key", "value"):
            linear(f"{b}.attention.self.{n}", T, T)
        linear(f"{b}.attention.output.dense", T, T)
        norm(f"{b}.attention.output.LayerNorm", T)
        linear(f"{b}.intermediate.dense", t["intermediate_size"], T)
        linear(f"{b}.output.dense", T, t["intermediate_size"])
        norm(f"{b}.output.LayerNorm", T)
    linear("text_transformer.pooler.dense", T, T)
    # fusion
    linear("cross_modal_text_transform", H, T)
    linear("cross_modal_image_transform", H, W)
    put("token_type_embeddings.weight", 2, H)
    for stream in ("text", "image"):
        for i in range(cfg.num_fusion_layers):
            b = f"cross_modal_{stream}_layers.{i}"
            for att in ("attention", "crossattention"):
                for n in ("query", "key", "value"):
                    linear(f"{b}.{att}.self.{n}", H, H)
                linear(f"{b}.{att}.output.dense", H, H)
                norm(f"{b}.{att}.output.LayerNorm", H)
            linear(f"{b}.intermediate.dense", cfg.intermediate_size, H)
            linear(f"{b}.output.dense", H, cfg.intermediate_size)
            norm(f"{b}.output.LayerNorm", H)
        linear(f"cross_modal_{stream}_pooler.dense", H, H)
    # task heads
    linear("vqa_classifier.0", 2 * H, 2 * H)
    norm("vqa_classifier.1", 2 * H)
    linear("vqa_classifier.3", 5, 2 * H)
    linear("itm_score.fc", 2, 2 * H)
    linear("mlm_score.transform.dense", H, H)
    norm("mlm_score.transform.LayerNorm", H)
    put("mlm_score.decoder.weight", t["vocab_size"], H)
    put("mlm_score.bias", t["vocab_size"])
    return sd


def reference_forward(sd: dict[str, torch.Tensor], cfg: MeterConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """METER's forward written directly on the official tensors (no converter involved)."""
    v, t = cfg.vision_config, cfg.text_config
    W = v["hidden_size"]

    def ln(x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def mha(x: torch.Tensor, y: torch.Tensor, heads: int, q, k, vv, o, pad: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        dh = d // heads
        split = lambda z: z.view(b, z.shape[1], heads, dh).transpose(1, 2)  # noqa: E731
        s = split(q(x)) @ split(k(y)).transpose(-1, -2) / dh**0.5
        if pad is not None:
            s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
        return o((s.softmax(-1) @ split(vv(y))).transpose(1, 2).reshape(b, n, d))

    # vision (OpenAI CLIP, nn.MultiheadAttention packing q, k, v)
    x = F.conv2d(batch["pixel_values"], sd["vit_model.visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    cls = sd["vit_model.visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = ln(torch.cat([cls, x], 1) + sd["vit_model.visual.positional_embedding"], "vit_model.visual.ln_pre", 1e-5)
    for i in range(v["num_hidden_layers"]):
        b = f"vit_model.visual.transformer.resblocks.{i}"
        wq, wk, wv = sd[f"{b}.attn.in_proj_weight"].split(W)
        bq, bk, bv = sd[f"{b}.attn.in_proj_bias"].split(W)
        h = ln(x, f"{b}.ln_1", 1e-5)
        x = x + mha(h, h, v["num_attention_heads"], lambda z: F.linear(z, wq, bq), lambda z: F.linear(z, wk, bk),
                    lambda z: F.linear(z, wv, bv), lambda z: lin(z, f"{b}.attn.out_proj"), None)
        h = lin(ln(x, f"{b}.ln_2", 1e-5), f"{b}.mlp.c_fc")
        x = x + lin(h * torch.sigmoid(1.702 * h), f"{b}.mlp.c_proj")
    image = ln(x, "vit_model.visual.ln_post", 1e-5)
    # text (RoBERTa: positions count non-pad tokens, starting after the pad id)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    nonpad = ids.ne(PAD).long()
    pos = torch.cumsum(nonpad, 1) * nonpad + PAD
    e = "text_transformer.embeddings"
    y = sd[f"{e}.word_embeddings.weight"][ids] + sd[f"{e}.position_embeddings.weight"][pos] + sd[f"{e}.token_type_embeddings.weight"][0]
    y = ln(y, f"{e}.LayerNorm", t["layer_norm_eps"])

    def bert_block(x: torch.Tensor, other: torch.Tensor, b: str, heads: int, eps: float, pad, other_pad, cross: bool) -> torch.Tensor:
        a = lambda name: (lambda z: lin(z, name))  # noqa: E731
        h = ln(x + mha(x, x, heads, a(f"{b}.attention.self.query"), a(f"{b}.attention.self.key"), a(f"{b}.attention.self.value"),
                       a(f"{b}.attention.output.dense"), pad), f"{b}.attention.output.LayerNorm", eps)
        if cross:
            h = ln(h + mha(h, other, heads, a(f"{b}.crossattention.self.query"), a(f"{b}.crossattention.self.key"),
                           a(f"{b}.crossattention.self.value"), a(f"{b}.crossattention.output.dense"), other_pad),
                   f"{b}.crossattention.output.LayerNorm", eps)
        return ln(h + lin(F.gelu(lin(h, f"{b}.intermediate.dense")), f"{b}.output.dense"), f"{b}.output.LayerNorm", eps)

    for i in range(t["num_hidden_layers"]):
        y = bert_block(y, y, f"text_transformer.encoder.layer.{i}", t["num_attention_heads"], t["layer_norm_eps"], mask, None, False)
    tt = sd["token_type_embeddings.weight"]
    xt = lin(y, "cross_modal_text_transform") + tt[0]
    xi = lin(image, "cross_modal_image_transform") + tt[1]
    for i in range(cfg.num_fusion_layers):
        h = cfg.num_attention_heads
        xt, xi = (bert_block(xt, xi, f"cross_modal_text_layers.{i}", h, cfg.layer_norm_eps, mask, None, True),
                  bert_block(xi, xt, f"cross_modal_image_layers.{i}", h, cfg.layer_norm_eps, None, mask, True))
    return torch.cat([torch.tanh(lin(xt[:, 0], "cross_modal_text_pooler.dense")),
                      torch.tanh(lin(xi[:, 0], "cross_modal_image_pooler.dense"))], -1)


def test_official_checkpoint_loads_and_matches_reference(model: MeterBackbone, config: MeterConfig, tmp_path: Path) -> None:
    sd = official_state_dict(config)
    path = tmp_path / "meter.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    report = load_meter_checkpoint(model, path)
    assert set(report.head_keys) == {k for k in sd if k.split(".")[0] in ("vqa_classifier", "itm_score", "mlm_score")}
    assert set(report.head_state("vqa_classifier")) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    assert "text_transformer.pooler.dense.weight" in report.ignored and report.position_grid is None
    # spot checks, including one split of a fused in_proj
    W = config.vision_config["hidden_size"]
    blk = model.vision_encoder.encoder.layers[1].self_attn
    packed = sd["vit_model.visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(blk.q_proj.weight, packed[:W]) and torch.equal(blk.k_proj.weight, packed[W:2 * W])
    assert torch.equal(blk.v_proj.weight, packed[2 * W:])
    assert torch.equal(blk.v_proj.bias, sd["vit_model.visual.transformer.resblocks.1.attn.in_proj_bias"][2 * W:])
    assert torch.equal(model.vision_encoder.embeddings.patch_embedding.weight, sd["vit_model.visual.conv1.weight"])
    assert torch.equal(model.text_encoder.encoder.layer[0].intermediate.dense.weight, sd["text_transformer.encoder.layer.0.intermediate.dense.weight"])
    assert torch.equal(model.cross_modal_image_layers[1].crossattention.self.key.weight, sd["cross_modal_image_layers.1.crossattention.self.key.weight"])
    # the whole forward equals METER's computation on the official tensors
    batch = make_batch(config)
    with torch.no_grad():
        ours = model(**batch)
        ref = reference_forward(sd, config, batch)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # a changed fusion weight in the file changes the output
    sd2 = dict(sd)
    sd2["cross_modal_image_layers.1.crossattention.self.value.weight"] = sd["cross_modal_image_layers.1.crossattention.self.value.weight"] + 0.5
    torch.save({"state_dict": sd2}, tmp_path / "meter2.ckpt")
    load_meter_checkpoint(model, tmp_path / "meter2.ckpt")
    with torch.no_grad():
        assert not torch.allclose(model(**batch), ours)


def test_lightning_metadata_and_position_resize(config: MeterConfig, tmp_path: Path) -> None:
    """Non-tensor pickled classes (hyper-parameters, callbacks) load inertly; a 6x6 position grid is resized to 8x8."""
    low = tiny_meter_config(vocab_size=VOCAB, pad_token_id=PAD, num_fusion_layers=2, max_text_len=TEXT_LEN, image_size=48)
    sd = official_state_dict(low)
    mod = types.ModuleType("fake_trainer_lib")

    class AttrDict(dict):
        pass

    class ReadOnly(dict):
        def __reduce__(self):  # noqa: ANN204
            return (ReadOnly, (dict(self),))

    class Callback:
        pass

    for cls in (AttrDict, ReadOnly, Callback):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    sys.modules[mod.__name__] = mod
    try:
        hp = AttrDict(config=ReadOnly(image_size=48, vit="ViT-B/16"))
        torch.save({"state_dict": sd, "hyper_parameters": hp, "callbacks": {Callback: {"best": torch.tensor(1.0)}}}, tmp_path / "pl.ckpt")
    finally:
        del sys.modules[mod.__name__]
    model = MeterBackbone(config).eval()
    report = load_meter_checkpoint(model, tmp_path / "pl.ckpt")
    assert report.position_grid == (6, 8)
    pos = model.vision_encoder.embeddings.position_embedding.weight
    assert pos.shape[0] == 65 and torch.equal(pos[0], sd["vit_model.visual.positional_embedding"][0])


def test_checkpoint_errors(model: MeterBackbone, config: MeterConfig, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_meter_checkpoint(model, tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    with pytest.raises(UserError, match="could not be read"):
        load_meter_checkpoint(model, junk)
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(UserError):
        load_meter_checkpoint(model, tmp_path / "list.ckpt")
    vilt = {"text_embeddings.word_embeddings.weight": torch.zeros(10, 8), "transformer.blocks.0.attn.qkv.weight": torch.zeros(24, 8),
            "pooler.dense.weight": torch.zeros(8, 8), "vqa_classifier.0.weight": torch.zeros(16, 8)}
    torch.save({"state_dict": vilt}, tmp_path / "vilt.ckpt")
    with pytest.raises(UserError, match="not a METER checkpoint"):
        load_meter_checkpoint(model, tmp_path / "vilt.ckpt")
    wide = official_state_dict(tiny_meter_config(vocab_size=VOCAB, pad_token_id=PAD, num_fusion_layers=2, max_text_len=TEXT_LEN, hidden_size=32))
    torch.save({"state_dict": wide}, tmp_path / "wide.ckpt")
    with pytest.raises(UserError, match="shape mismatches"):
        load_meter_checkpoint(model, tmp_path / "wide.ckpt")
    deeper = official_state_dict(tiny_meter_config(vocab_size=VOCAB, pad_token_id=PAD, num_fusion_layers=3, max_text_len=TEXT_LEN))
    torch.save({"state_dict": deeper}, tmp_path / "deeper.ckpt")
    with pytest.raises(UserError, match="no place in the model"):
        load_meter_checkpoint(model, tmp_path / "deeper.ckpt")
