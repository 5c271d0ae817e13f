"""Image-text retrieval (Flickr30K style): a rank head on the pooled features of each (image, caption) pair,
trained to pick an image's caption among negatives, evaluated by IR and TR recall@1/5/10 over the val split.

Follows ViLT/METER's ``irtr`` fine-tuning: the head is a linear layer to one matching score (their
``rank_output``); each training image meets its caption and ``num_negatives`` captions (their
``draw_false_text`` = 15, drawn at random from other images), and the loss is the cross-entropy of the true
caption over those 1 + k scores. Evaluation scores every (caption, image) pair of the val split with the head
(their ``compute_irtr_recall``); ``rerank_top_k`` scores only the top k candidates of each query by the cosine of
the backbone's unimodal [CLS] states. Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from apt_ray.tasks.base import MODEL_INPUTS
from apt_ray.tasks.registry import register_task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from apt_ray.data.retrieval import RetrievalData
    from apt_ray.data.spec import DataSpec
    from apt_ray.tasks.base import EvalContext

RECALL_SCORE = "val_recall_mean"  # mean of IR and TR R@1/5/10 in percent: the task's score


def pair_features(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled features of each (caption, image) pair: with G text rows per image (rows i*G ... (i+1)*G - 1 belong
    to image i), each image is repeated G times; one backbone pass over the pairs."""
    import torch

    texts, images = input_ids.shape[0], pixel_values.shape[0]
    if images == 0 or texts % images:
        raise ValueError(f"{texts} caption rows cannot be split evenly over {images} images")
    group = texts // images
    if group > 1:
        pixel_values = torch.repeat_interleave(pixel_values, group, dim=0)
        pixel_mask = None if pixel_mask is None else torch.repeat_interleave(pixel_mask, group, dim=0)
    return backbone(input_ids, attention_mask, pixel_values, pixel_mask)


def rank_head(backbone: nn.Module) -> nn.Module:
    """ViLT/METER's ``rank_output``: pooled features -> one matching score. The authors start it from the positive
    row of their pretrained ITM head; the tiny backbones keep no ITM head (pretraining saves the backbone only), so
    it starts from ``nn.Linear``'s default (seeded) initialisation."""
    from torch import nn

    return nn.Linear(backbone.pooled_size, 1)


def rank_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each image's true caption over it and its ``num_negatives`` highest-scoring negatives (with
    random negatives: all of them)."""
    import torch
    import torch.nn.functional as F

    negative = batch["negative"]
    b, g = negative.shape
    scores = logits.float().reshape(b, g)
    positive = scores.gather(1, batch["target"].view(b, 1))
    k = min(int(batch["num_negatives"][0]), g - 1)
    hardest = scores.masked_fill(~negative, float("-inf")).topk(k, dim=1).values
    candidates = torch.cat([positive, hardest], dim=1)
    return F.cross_entropy(candidates, torch.zeros(b, dtype=torch.long, device=scores.device))


def candidate_pairs(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, data: RetrievalData,
                    ctx: EvalContext, k: int) -> torch.Tensor:
    """(M captions, N images) bool: the pairs the matching head scores under ``rerank_top_k=k``: each caption's
    top k images and each image's top k captions by the cosine of the unimodal [CLS] states."""
    import torch
    import torch.nn.functional as F

    bs, dev = data.eval_batch_size, ctx.device
    one_text = input_ids[:1].to(dev), attention_mask[:1].to(dev)  # unimodal_cls encodes both sides: keep the other small
    text_cls, image_cls = [], []
    with ctx.autocast:
        for batch in data.val_loader:  # in image order
            pixels = batch["pixel_values"].to(dev)
            image_cls.append(backbone.unimodal_cls(*one_text, pixels)[1].float())
        for start in range(0, input_ids.shape[0], bs):
            ids, mask = input_ids[start:start + bs].to(dev), attention_mask[start:start + bs].to(dev)
            text_cls.append(backbone.unimodal_cls(ids, mask, pixels[:1])[0].float())
    cheap = F.normalize(torch.cat(text_cls), dim=-1) @ F.normalize(torch.cat(image_cls), dim=-1).T
    cheap = cheap.cpu()
    m, n = cheap.shape
    chosen = torch.zeros(m, n, dtype=torch.bool)
    chosen.scatter_(1, cheap.topk(min(k, n), dim=1).indices, True)
    chosen.scatter_(0, cheap.topk(min(k, m), dim=0).indices, True)
    return chosen


def score_matrix(model: nn.Module, data: RetrievalData, ctx: EvalContext) -> torch.Tensor:
    """(M captions, N images) matching scores of the val split. This rank scores caption rows rank, rank + W, ...
    against every image and ``ctx.all_sum`` joins the rows; with ``rerank_top_k`` the pairs left out score -inf."""
    import torch

    from apt_ray.data.collate import encode_texts

    net = getattr(model, "module", model)  # unwrapped: ranks run different numbers of forwards here
    val, dev, bs = data.val, ctx.device, data.eval_batch_size
    m, n = len(val.captions), len(val.image_ids)
    input_ids, attention_mask, _ = encode_texts(data.tokenizer, val.captions, data.spec.max_text_len)
    k = data.spec.rerank_top_k
    chosen = None if not k else candidate_pairs(net.backbone, input_ids, attention_mask, data, ctx, k)
    rows = torch.arange(ctx.rank, m, ctx.world_size)
    scores = torch.zeros(m, n, dtype=torch.float64)
    for batch in data.val_loader:
        pixels = batch["pixel_values"].to(dev)
        pixel_mask = batch.get("pixel_mask")
        for i, image in enumerate(batch["image_index"].tolist()):
            mine = rows if chosen is None else rows[chosen[rows, image]]
            for start in range(0, len(mine), bs):
                r = mine[start:start + bs]
                with ctx.autocast:
                    pooled = net.features(net.backbone, input_ids[r].to(dev), attention_mask[r].to(dev), pixels[i:i + 1],
                                          None if pixel_mask is None else pixel_mask[i:i + 1].to(dev))
                # the head in fp32: a bf16 score keeps 8 bits, which would tie close candidates
                scores[r, image] = net.head(pooled.float()).squeeze(-1).double().cpu()
    if ctx.world_size > 1:
        scores = torch.tensor(ctx.all_sum(scores.flatten().tolist()), dtype=torch.float64).view(m, n)
    if chosen is not None:
        scores.masked_fill_(~chosen, float("-inf"))
    return scores


@register_task("retrieval")
class RetrievalTask:
    """Image-text retrieval; its score is the mean of the six recalls (IR and TR at 1, 5 and 10), which uses both
    directions and every cut-off, so a small validation split gives a steadier signal than R@1 alone."""

    score = RECALL_SCORE
    score_label = "validation mean recall (IR and TR R@1/5/10)"
    eval_keys = ("ir_hits_1", "ir_hits_5", "ir_hits_10", "tr_hits_1", "tr_hits_5", "tr_hits_10", "captions", "images")
    batch_keys = MODEL_INPUTS
    metric_aliases: dict[str, str] = {}
    features = staticmethod(pair_features)
    backbone_passes = 1  # a profile counts one (image, caption) pair: training runs 1 + k per image, evaluation N x M
    default_head_width = 1

    def build_data(self, spec: DataSpec) -> RetrievalData:
        from apt_ray.data.retrieval import build_retrieval_data

        return build_retrieval_data(spec)

    def make_head(self, backbone: nn.Module, data: RetrievalData) -> nn.Module:
        from apt_ray.errors import UserError

        if data.spec.rerank_top_k and getattr(backbone, "unimodal_cls", None) is None:
            raise UserError(f"rerank_top_k={data.spec.rerank_top_k} ranks candidates by the backbone's unimodal [CLS] "
                            f"states, which {type(backbone).__name__} does not provide (METER does): leave "
                            "rerank_top_k unset to score every pair, or use a METER backbone.")
        return rank_head(backbone)

    def profile_head(self, backbone: nn.Module, width: int) -> nn.Module:
        return rank_head(backbone)

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return rank_loss(logits, batch)

    def eval_batch(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> Mapping[str, float]:
        raise TypeError("retrieval recall needs the whole split's score matrix: the task evaluates with its own "
                        "evaluate(), not batch by batch")

    def metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        from apt_ray.data.recall import recall_metrics

        return recall_metrics(dict(sums))

    def evaluate(self, model: nn.Module, data: RetrievalData, ctx: EvalContext) -> dict[str, float]:
        import torch

        from apt_ray.data.recall import recall_hits

        scores = score_matrix(model, data, ctx)
        return self.metrics(recall_hits(scores, torch.tensor(data.val.caption_image)))

    def head_width(self, data: RetrievalData) -> int:
        return 1

    def result_facts(self, data: RetrievalData) -> dict[str, Any]:
        from apt_ray.data.recall import chance_recall

        chance = chance_recall(data.val.captions_per_image)
        return {"images_ranked": len(data.val.image_ids), "captions_ranked": len(data.val.captions),
                "chance_recall_mean": chance[RECALL_SCORE], "chance_ir_r1": chance["val_ir_r1"],
                "chance_tr_r1": chance["val_tr_r1"]}
