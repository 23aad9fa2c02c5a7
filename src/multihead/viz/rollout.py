"""Attention rollout (Abnar & Zuidema, 2020): how much each top-layer token draws on each input.

One layer's weights say where a token looks in the layer below, not in the input: after a
few layers every token is a mix. Rollout follows the mix down. Each layer's heads are fused
(mean by default), the residual connection is added as an identity,
``A = residual·I + (1 - residual)·W`` with rows re-normalised to sum to 1, and the layers are
multiplied from the first up: ``R = A_L ··· A_2 · A_1``. ``R[i, j]`` is the share of input
token j in top-layer token i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

HeadFusion = Literal["mean", "max", "min"]

__all__ = ["image_rollout", "rollout"]


def _fuse(weights: Tensor, head_fusion: HeadFusion) -> Tensor:
    if weights.ndim == 2:  # already one map
        return weights
    if head_fusion == "mean":
        return weights.mean(dim=-3)
    if head_fusion == "max":
        return weights.amax(dim=-3)
    return weights.amin(dim=-3)


def rollout(
    weights_per_layer: Sequence[Tensor],
    *,
    residual: float = 0.5,
    head_fusion: HeadFusion = "mean",
) -> Tensor:
    """Roll the self-attention weights of a stack out to the input tokens.

    Args:
        weights_per_layer: first layer first; each (..., heads, n, n) or (n, n), as captured
            (e.g. ``[captured[f"encoder.layers.{i}.self_attn"] for i in range(L)]``).
        residual: the identity's share (0.5 in the paper; 0 gives the plain product).
        head_fusion: how heads become one map: "mean" (the paper), "max" or "min".

    Returns (..., n, n) in float32; every row sums to 1.
    """
    if isinstance(weights_per_layer, Tensor) or not len(weights_per_layer):
        raise ValueError("weights_per_layer must be a non-empty sequence of tensors, one a layer")
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    result: Tensor | None = None
    for i, weights in enumerate(weights_per_layer):
        if not isinstance(weights, Tensor):
            raise TypeError(f"layer {i} weights must be a Tensor, got {type(weights).__name__}")
        if weights.ndim < 2 or weights.shape[-1] != weights.shape[-2]:
            raise ValueError(
                f"layer {i} weights must be square self-attention (..., n, n), "
                f"got shape {tuple(weights.shape)}"
            )
        fused = _fuse(weights.float(), head_fusion)
        eye = torch.eye(fused.shape[-1], device=fused.device)
        mixed = residual * eye + (1.0 - residual) * fused
        # A row with no visible key (weights 0) keeps only the identity after this.
        mixed = mixed / mixed.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mixed.dtype).tiny)
        if result is not None and result.shape[-1] != mixed.shape[-1]:
            raise ValueError(
                f"layer {i} has {mixed.shape[-1]} tokens but the layers before have "
                f"{result.shape[-1]}"
            )
        result = mixed if result is None else mixed @ result
    assert result is not None
    return result


def image_rollout(
    weights_per_layer: Sequence[Tensor],
    grid: tuple[int, int],
    *,
    token: int = 0,
    residual: float = 0.5,
    head_fusion: HeadFusion = "mean",
) -> Tensor:
    """The rollout of one token (a ViT's class token: 0) over the image patches, as a grid.

    The patches are taken to be the last ``grid[0]·grid[1]`` tokens, row-major (after any
    class or register tokens). Returns (..., grid_h, grid_w), scaled so its maximum is 1.
    """
    rolled = rollout(weights_per_layer, residual=residual, head_fusion=head_fusion)
    n, patches = rolled.shape[-1], grid[0] * grid[1]
    if patches > n:
        raise ValueError(f"grid {grid} has {patches} patches but the layers have {n} tokens")
    if not -n <= token < n:
        raise ValueError(f"token must index one of the {n} tokens, got {token}")
    share = rolled[..., token, n - patches :]
    share = share / share.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(share.dtype).tiny)
    return share.unflatten(-1, grid)
