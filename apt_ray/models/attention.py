"""Multi-head attention over a backbone's own projection layers, with site hooks.

Wrapped attention modules call :func:`site_attention` with the pretrained
``W_q, W_k, W_v, W_o`` Linear layers; the methods attached to the site may add
keys/values or transform the output. Pretrained weights are never copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apt_ray.methods.sites import SiteAttention


def _pad_mask(mask: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """Extend an attention mask (bool: True = attend, or additive float) over ``extra`` new keys."""
    if mask is None or extra == 0:
        return mask
    value = True if mask.dtype == torch.bool else 0.0
    return F.pad(mask, (0, extra), value=value)


def site_attention(
    site: SiteAttention,
    query: nn.Linear,
    key: nn.Linear,
    value: nn.Linear,
    out: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    num_heads: int,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``MHA(x W_q, y W_k, y W_v) W_o`` with the site's methods applied.

    ``x``: query-side input (B, Nq, d); ``y``: key/value source (B, Nk, d).
    ``mask``: broadcastable to (B, h, Nq, Nk), bool (True = attend) or additive.
    """
    b, nq, _ = x.shape
    q, k, v = query(x), key(y), value(y)
    extra = 0
    for method in site.site_methods:
        kv = method.extra_kv(x, y, site)
        if kv is not None:
            kp, vp = kv
            k = torch.cat([k, kp.expand(b, -1, -1).to(k.dtype)], dim=1)
            v = torch.cat([v, vp.expand(b, -1, -1).to(v.dtype)], dim=1)
            extra += kp.shape[1]
    mask = _pad_mask(mask, extra)
    d = q.shape[-1]
    dh = d // num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], num_heads, dh).transpose(1, 2)

    ctx = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask, dropout_p=dropout_p)
    o = out(ctx.transpose(1, 2).reshape(b, nq, d))
    for method in site.site_methods:
        o = method.transform_output(x, o)
    return o
