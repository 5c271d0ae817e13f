"""Prompt pruning's knobs (E2VPT's second step), shared by the methods with prompt tokens, and the rules that need no
torch: how many prompts a keep ratio leaves, which configurations may prune, and the spec a pruned method runs as.

The pruning itself (masks, scores, the cut) is :mod:`apt_ray.methods.pruning`; the training phases around it are
:mod:`apt_ray.train.rewind`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from apt_ray.methods.registry import MethodConfig

KEEP_ALL = 1.0


class PruneConfig(MethodConfig):
    """Methods whose prompts are rows of a per-site tensor P: they can be pruned after training and retrained."""

    prune_keep: float = Field(
        KEEP_ALL, gt=0, le=1, description="share of each site's prompts kept by E2VPT-style pruning after training, "
        "then retrained (1: no pruning); k = ceil(prune_keep * num_prompts)")
    prune_mode: Literal["token", "segment"] = Field(
        "token", description="prune single prompt tokens, or whole segments of num_prompts / prune_segments "
        "consecutive tokens")
    prune_segments: int = Field(4, ge=1, description="segments per site in prune_mode=segment")
    rewind_epochs: int | None = Field(
        None, ge=1, description="epochs that retrain the kept prompts after pruning (default: epochs)")


def kept_groups(total: int, keep: float) -> int:
    """Groups (tokens or segments) a keep ratio leaves: ``ceil(keep * total)``, at least one. The ceiling never keeps
    less than the ratio asks; a tiny tolerance keeps 0.25 * 32 at 8 despite float rounding."""
    return max(1, min(total, math.ceil(keep * total - 1e-9)))


def kept_prompts(num_prompts: int, keep: float, mode: str = "token", segments: int = 4) -> int:
    """Prompts per site after pruning: token-wise ``ceil(keep * p)``; segment-wise whole segments of ``p / segments``
    tokens, ``ceil(keep * segments)`` of them."""
    if keep >= KEEP_ALL:
        return num_prompts
    if mode == "segment":
        return kept_groups(segments, keep) * (num_prompts // segments)
    return kept_groups(num_prompts, keep)


def prunes(values: Any) -> bool:
    """Whether a spec or trial config (anything with ``prune_keep``) asks for pruning."""
    return getattr(values, "prune_keep", KEEP_ALL) < KEEP_ALL


def check_pruning(method: str, values: Any) -> None:
    """Refuse pruning where it cannot apply: a method without prompt rows, OFA-PT's shared encoder, segments that do
    not split the prompts evenly. Raises ``UserError`` (one paragraph), which pydantic passes through unchanged."""
    if not prunes(values):
        return
    from apt_ray.errors import UserError
    from apt_ray.methods.registry import get_method, knob_users

    keep = values.prune_keep
    if "prune_keep" not in get_method(method).config.model_fields:
        raise UserError(
            f"prune_keep={keep:g} asks to prune prompt tokens, but method '{method}' has no prompts to prune: pruning "
            f"applies to {', '.join(knob_users('prune_keep'))}. Leave prune_keep at 1 for {method}.")
    if getattr(values, "reparam_hidden", None):
        raise UserError(
            f"prune_keep={keep:g} cannot prune deep_prompt with reparam_hidden={values.reparam_hidden}: its prompts come "
            "from OFA-PT's shared prefix encoder, not from per-site rows. Drop reparam_hidden or leave prune_keep at 1.")
    if values.prune_mode == "segment":
        p, s = values.num_prompts, values.prune_segments
        if s > p or p % s:
            raise UserError(
                f"prune_mode=segment with prune_segments={s} cannot split num_prompts={p} into equal segments: give a "
                f"prune_segments that divides {p} (e.g. {max(d for d in range(1, min(p, 4) + 1) if p % d == 0)}), or "
                "prune_mode=token.")


def pruned_spec(spec: Any) -> Any:
    """The spec a pruned method runs as at inference: its kept prompt count and no further pruning (its cost, its
    parameters and its checkpoint are those of this spec)."""
    if not prunes(spec):
        return spec
    k = kept_prompts(spec.num_prompts, spec.prune_keep, spec.prune_mode, spec.prune_segments)
    return spec.model_copy(update={"num_prompts": k, "prune_keep": KEEP_ALL})


def pruning_summary(spec: Any) -> dict[str, Any]:
    """What a cost profile says about pruning (empty when the spec does not prune)."""
    if not prunes(spec):
        return {}
    k = kept_prompts(spec.num_prompts, spec.prune_keep, spec.prune_mode, spec.prune_segments)
    out = {"keep": spec.prune_keep, "mode": spec.prune_mode, "trained_prompts": spec.num_prompts, "kept_prompts": k,
           "rule": "k = ceil(keep * p) tokens per site"}
    if spec.prune_mode == "segment":
        size = spec.num_prompts // spec.prune_segments
        out.update(segments=spec.prune_segments, kept_segments=k // size, segment_size=size,
                   rule=f"whole segments of {size} tokens: ceil(keep * {spec.prune_segments}) = {k // size} segments "
                        f"kept, so k = {k} per site")
    out["cost"] = "inference: the method with k prompts per site (the first training phase runs with all p)"
    return out
