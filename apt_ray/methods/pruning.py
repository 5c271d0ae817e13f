"""E2VPT-style prompt pruning: soft masks on the prompt rows, importance scores from them, and the cut.

A prunable site method (:class:`PromptRows`) keeps its prompts as rows of the parameters named in
``prompt_params`` (p x d each) and scales them by ``row_mask`` when one is attached. As in E2VPT, the masks are all
ones, so they leave the output unchanged, and the importance of a prompt token is the size of the loss's gradient
with respect to its mask, averaged over the training batches: ``score_i = mean_b |dL_b / dm_i|``, a first-order
estimate of how much the loss moves when the token is removed. A segment (``p / S`` consecutive tokens) has one
mask of its own in E2VPT's two-level scheme; its gradient is the sum of its tokens', so its score is
``mean_b |sum_{i in s} dL_b / dm_i|``.

Pruning keeps the highest-scored tokens (or segments) of each site, in their original order, and replaces each prompt
parameter by its kept rows: the pruned method is physically a method with k prompts per site, with the trained values
of the rows it kept.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from apt_ray.methods.configs.pruning import kept_groups

Kept = dict[str, list[int]]  # site method's module path -> kept row indices (ascending)


class PromptRows:
    """Mixin of a site method whose prompt tokens are the rows of the parameters in ``prompt_params``."""

    prompt_params: ClassVar[tuple[str, ...]] = ()
    row_mask: torch.Tensor | None = None

    def masked(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (p x d, or batch x p x d) scaled by the soft mask, one factor per prompt token."""
        if self.row_mask is None:
            return rows
        return rows * self.row_mask.to(rows.dtype).unsqueeze(-1)

    @property
    def num_rows(self) -> int:
        return next(getattr(self, n) for n in self.prompt_params if getattr(self, n, None) is not None).shape[0]


def prompt_sites(model: nn.Module) -> dict[str, PromptRows]:
    """The prunable site methods of ``model`` by module path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PromptRows) and m.prompt_params}


def attach_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Give every prunable site a soft mask of ones (requires grad); returns them by module path."""
    masks = {}
    for name, site in prompt_sites(model).items():
        param = next(p for n in site.prompt_params if (p := getattr(site, n, None)) is not None)
        site.row_mask = masks[name] = torch.ones(site.num_rows, device=param.device, requires_grad=True)
    return masks


def detach_masks(model: nn.Module) -> None:
    for site in prompt_sites(model).values():
        site.row_mask = None


def group_gradient(grad: torch.Tensor, mode: str, segments: int) -> torch.Tensor:
    """One batch's mask gradient per pruning unit: per token, or summed within each segment."""
    return grad if mode == "token" else grad.view(segments, -1).sum(dim=1)


def importance_scores(model: nn.Module, batches: Iterable, loss_of: Callable[[object], torch.Tensor],
                      mode: str = "token", segments: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over ``batches`` of ``|dL/dm|`` per token (or segment) of each prunable site, and the batch count (the
    caller averages, after adding over ranks). ``loss_of(batch)`` runs the model and returns the batch's loss. Only
    the masks get gradients: the method's parameters and their ``.grad`` are left alone."""
    masks = attach_masks(model)
    names = list(masks)
    totals = {n: torch.zeros(masks[n].shape[0] if mode == "token" else segments, dtype=torch.float64) for n in names}
    count = 0
    try:
        for batch in batches:
            grads = torch.autograd.grad(loss_of(batch), [masks[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    totals[n] += group_gradient(g.detach().double().cpu(), mode, segments).abs()
            count += 1
    finally:
        detach_masks(model)
    return totals, count


def select(scores: dict[str, torch.Tensor], keep: float, rows: dict[str, int] | None = None) -> Kept:
    """The rows each site keeps: its ``ceil(keep * units)`` highest-scored units, ties going to the earlier one, in
    ascending order. A unit is a token, or with ``rows`` (prompts per site) a segment of ``rows / units`` tokens,
    expanded to the tokens it covers."""
    kept: Kept = {}
    for name, s in scores.items():
        units = s.shape[0]
        size = rows[name] // units if rows else 1
        order = sorted(range(units), key=lambda i: (-float(s[i]), i))
        kept[name] = [u * size + j for u in sorted(order[:kept_groups(units, keep)]) for j in range(size)]
    return kept


def row_counts(model: nn.Module) -> dict[str, int]:
    """Prompts per prunable site."""
    return {name: site.num_rows for name, site in prompt_sites(model).items()}


@torch.no_grad()
def prune_rows(site: PromptRows, kept: list[int]) -> None:
    """Replace each prompt parameter of ``site`` by its ``kept`` rows (new, smaller parameters, same values)."""
    index = torch.as_tensor(kept, dtype=torch.long)
    for name in site.prompt_params:
        param = getattr(site, name, None)
        if param is None:
            continue
        rows = param.detach().index_select(0, index.to(param.device)).clone()
        setattr(site, name, nn.Parameter(rows, requires_grad=param.requires_grad))


def prune(model: nn.Module, kept: Kept) -> None:
    """Cut every prunable site of ``model`` to its ``kept`` rows (``kept`` must name each of them)."""
    sites = prompt_sites(model)
    missing = sorted(set(sites) - set(kept))
    if missing:
        raise ValueError(f"no kept rows given for {missing[:3]}")
    for name, site in sites.items():
        prune_rows(site, kept[name])
