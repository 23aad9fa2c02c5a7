"""torch's fused scaled_dot_product_attention: the fast path when no weights are needed."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import Request

NAME = "sdpa"


def unsupported(request: Request) -> str | None:
    """Why SDPA cannot serve this request, or None if it can."""
    if request.return_weights:
        return "it does not return attention weights"
    if request.softcap is not None:
        return "it has no logit soft-capping"
    return None


def forward(request: Request) -> tuple[Tensor, None]:
    mask = request.mask
    if mask is not None and mask.dtype.is_floating_point:
        mask = mask.to(request.query.dtype)  # SDPA wants the bias in the query's dtype
    output = F.scaled_dot_product_attention(
        request.query,
        request.key,
        request.value,
        attn_mask=mask,
        dropout_p=request.dropout_p,
        is_causal=request.is_causal,
        scale=request.scale,
        enable_gqa=request.num_kv_heads != request.num_heads,
    )
    return output, None


def explain(request: Request) -> str:
    if request.is_causal:
        how = "is_causal fast path (plain causal mask, no mask tensor built)"
    elif request.mask is None:
        how = "no mask"
    elif request.mask.dtype.is_floating_point:
        how = "additive float mask"
    else:
        how = "dense boolean mask"
    gqa = (
        f", grouped-query {request.num_heads}/{request.num_kv_heads} heads"
        if request.num_kv_heads != request.num_heads
        else ""
    )
    return f"sdpa: torch.nn.functional.scaled_dot_product_attention, {how}{gqa}"
