"""CLIPN's training losses: image-text binary-opposite (ITBO) and text semantic-opposite (TSO).

Formulas from the official code (xmed-lab/CLIPN ``open_clip/loss.py``, commit e465074), with N the
global batch, c_ij = <f_i, g_j>, c_no_ij = <f_i, g_no_j>, s = exp(logit_scale):

    p_no_ij = sigmoid(s (c_no_ij - c_ij))
    L_yes   = -(1/N)        Σ_i     log(1 - p_no_ii)
    L_no    = -(1/(N²-N))   Σ_{i≠j} log p_no_ij
    L_tso   =  (1/N)        Σ_j     (2 - sqrt(2 - 2 <g_j, g_no_j> + 1e-4))
    total   =  0.5 (L_yes + L_no + L_tso)

The official code takes a softmax over (yes, no) logits and then a log, which is -inf once the gap passes ~100
in fp32; log-sigmoid of the difference is the same quantity and stays finite.

Distributed training (DDP averages gradients over ranks) is handled by :func:`distributed_clipn_loss`:
every returned value is the loss of the whole global batch, and its gradient, once DDP has averaged it, equals
the single-process gradient of that loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

#: The official epsilon inside the TSO square root (keeps its gradient finite when g = g_no).
TSO_EPS = 1e-4
PARTS: tuple[str, ...] = ("total", "itbo_yes", "itbo_no", "tso")


def _itbo_sums(
    image_rows: Tensor, text_cols: Tensor, text_no_cols: Tensor, scale: float | Tensor, row_offset: int
) -> tuple[Tensor, Tensor]:
    """Unnormalised ITBO sums over the given image rows against all text columns.

    Returns (-Σ_i log(1 - p_no_ii), -Σ_{i≠j} log p_no_ij) where row i of ``image_rows`` is pair
    ``row_offset + i`` of the global batch.
    """
    gap = scale * (image_rows @ (text_no_cols - text_cols).T)  # s (c_no - c): the logit of p_no
    rows = torch.arange(image_rows.shape[0], device=gap.device)
    diagonal = torch.zeros_like(gap, dtype=torch.bool)
    diagonal[rows, rows + row_offset] = True
    yes_sum = -F.logsigmoid(-gap[diagonal]).sum()  # log(1 - sigmoid(x)) = logsigmoid(-x)
    no_sum = -F.logsigmoid(gap[~diagonal]).sum()
    return yes_sum, no_sum


def _tso_sum(text_features: Tensor, text_features_no: Tensor) -> Tensor:
    # ||g - g_no||² = 2 - 2<g, g_no> for unit vectors; clamped at 0 so rounding (<g, g_no> a hair above 1)
    # cannot make the root NaN.
    squared = (2 - 2 * (text_features * text_features_no).sum(-1)).clamp_min(0)
    distance = torch.sqrt(squared + TSO_EPS)
    return (2 - distance).sum()


def _combine(yes_sum: Tensor, no_sum: Tensor, tso_sum: Tensor, n: int) -> dict[str, Tensor]:
    itbo_yes = yes_sum / n
    itbo_no = no_sum / (n * n - n)
    tso = tso_sum / n
    return {"total": 0.5 * (itbo_yes + itbo_no + tso), "itbo_yes": itbo_yes, "itbo_no": itbo_no, "tso": tso}


def _check(image_features: Tensor, text_features: Tensor, text_features_no: Tensor, n: int) -> None:
    if not (image_features.shape == text_features.shape == text_features_no.shape) or image_features.ndim != 2:
        raise ValueError(
            "image, text and no-text features must all be (N, D); got "
            f"{tuple(image_features.shape)}, {tuple(text_features.shape)}, {tuple(text_features_no.shape)}"
        )
    if n < 2:
        raise ValueError("the ITBO 'no' term needs at least 2 image-text pairs in the (global) batch")


def clipn_loss(
    image_features: Tensor, text_features: Tensor, text_features_no: Tensor, scale: float | Tensor
) -> dict[str, Tensor]:
    """The CLIPN loss of one batch of matched pairs (all features L2-normalised) → total, itbo_yes, itbo_no, tso.

    Computed in fp32 whatever the input dtype (autocast-safe).
    """
    n = image_features.shape[0]
    _check(image_features, text_features, text_features_no, n)
    f, g, g_no = image_features.float(), text_features.float(), text_features_no.float()
    yes_sum, no_sum = _itbo_sums(f, g, g_no, scale, row_offset=0)
    return _combine(yes_sum, no_sum, _tso_sum(g, g_no), n)


def p_no(image_features: Tensor, text_features: Tensor, text_features_no: Tensor, scale: float | Tensor) -> Tensor:
    """The N×N matrix p_no_ij = sigmoid(s (c_no_ij − c_ij)): how strongly image i says "not text j"."""
    f, g, g_no = image_features.float(), text_features.float(), text_features_no.float()
    return torch.sigmoid(scale * (f @ (g_no - g).T))


class _GatherFeatures(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own shard.

    ``sum_over_ranks=False``: every rank evaluated the same global loss, so its own slice of the gradient is
    already the full gradient of that loss w.r.t. its shard. ``True``: each rank evaluated a different part of
    the loss, so the slices are summed over ranks (all_reduce) first.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, sum_over_ranks: bool) -> Tensor:  # type: ignore[override]
        ctx.rank, ctx.world, ctx.sum_over_ranks, ctx.n = (
            dist.get_rank(),
            dist.get_world_size(),
            sum_over_ranks,
            len(x),
        )
        shards = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if ctx.sum_over_ranks:
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def _value_with_scaled_grad(contribution: Tensor, value: Tensor, factor: float) -> Tensor:
    """A tensor whose value is ``value`` and whose gradient is ``factor`` × the gradient of ``contribution``."""
    scaled = factor * contribution
    return scaled + (value - scaled).detach()


def distributed_clipn_loss(
    image_features: Tensor,
    text_features: Tensor,
    text_features_no: Tensor,
    scale: float | Tensor,
    *,
    local_loss: bool = False,
) -> dict[str, Tensor]:
    """:func:`clipn_loss` of the global batch spread over the ranks of the default process group.

    Each rank passes its local (n, D) shard (all shards the same size). ``local_loss=False`` (official): every
    rank gathers all features and evaluates the global N×N loss; gradients flow to the local shard only.
    ``local_loss=True``: each rank evaluates only its n rows against the N gathered columns (n×N memory
    instead of N×N) and the column gradients are summed back to their owners.

    Either way each returned value is the global-batch loss on every rank, and its gradient is scaled by the
    world size so that DDP's gradient *average* equals the single-process gradient of the global batch
    (the official code skips this factor, which only rescales the gradients by 1/world_size).
    Without an initialised process group (or with one rank) this is :func:`clipn_loss`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return clipn_loss(image_features, text_features, text_features_no, scale)
    world, rank = dist.get_world_size(), dist.get_rank()
    n_local = image_features.shape[0]
    n = n_local * world
    _check(image_features, text_features, text_features_no, n)
    f, g, g_no = image_features.float(), text_features.float(), text_features_no.float()
    if not local_loss:
        parts = clipn_loss(
            _GatherFeatures.apply(f, False),
            _GatherFeatures.apply(g, False),
            _GatherFeatures.apply(g_no, False),
            scale,
        )
        return {k: _value_with_scaled_grad(v, v, float(world)) for k, v in parts.items()}
    yes_sum, no_sum = _itbo_sums(
        f, _GatherFeatures.apply(g, True), _GatherFeatures.apply(g_no, True), scale, row_offset=rank * n_local
    )
    local = _combine(yes_sum, no_sum, _tso_sum(g, g_no), n)  # this rank's share; the shares sum to the loss
    summed = torch.stack([local[k].detach() for k in PARTS])
    dist.all_reduce(summed)
    return {k: _value_with_scaled_grad(local[k], summed[i], float(world)) for i, k in enumerate(PARTS)}
