"""Attention weights from the tiled kernel's log-sum-exp, for a few rows and heads.

The tiled kernel never builds the weight matrix, but it returns each row's log-sum-exp, and
a weight is exp(score − lse): exact, and only the requested rows × keys are computed, so a
long sequence can be inspected without the full matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masks import Mask
from ..score_mods import ScoreMod, as_score_mod, chain
from ..score_mods import softcap as softcap_mod
from .base import combine_masks

__all__ = ["tiled_weights"]


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    return (q * scale) @ k.transpose(-2, -1)


def _positions(name: str, index: object, size: int, device: torch.device) -> Tensor:
    """``index`` (None = all, a slice, or 1-D integer indices) as int64 positions < size."""
    if index is None or isinstance(index, slice):
        return torch.arange(size, device=device)[index if index is not None else slice(None)]
    if isinstance(index, list | tuple):
        index = torch.as_tensor(index, dtype=torch.int64)
    if (
        not isinstance(index, Tensor)
        or index.dtype.is_floating_point
        or index.dtype.is_complex
        or index.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be None, a slice or 1-D integer indices, got {index!r}")
    if index.ndim != 1:
        raise ValueError(f"{name} must be 1-D indices, got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < -size or int(index.max()) >= size):
        raise ValueError(f"{name} must be in [-{size}, {size}), got {index.tolist()}")
    return index.to(device=device, dtype=torch.int64) % max(size, 1)


def tiled_weights(
    query: Tensor,
    key: Tensor,
    lse: Tensor,
    *,
    rows: slice | Tensor | None = None,
    heads: slice | Tensor | None = None,
    mask: Mask | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    """The attention weights of some query rows and heads, recomputed from the log-sum-exp.

    ``lse`` (batch, heads, q_len) is what `tiled_attention` returned for the same inputs,
    mask, scale, softcap and score mod. A weight is exp(score − lse): exact, and only the requested
    (rows × k_len) scores of the requested heads are built, so a long sequence can be
    inspected without the full matrix. ``rows``/``heads``: None (all), a slice or 1-D integer
    indices; a key/value head serves its query group (GQA). Returns (batch, len(heads),
    len(rows), k_len) in fp32 (fp64 for fp64 inputs), the reference kernel's weights for those
    rows and heads (before dropout); a row that sees no key gets weights 0.
    """
    batch, num_heads, q_len, _ = query.shape
    k_len, kv_heads = key.shape[2], key.shape[1]
    if tuple(lse.shape) != (batch, num_heads, q_len):
        raise ValueError(
            f"lse has shape {tuple(lse.shape)} but query needs (batch, heads, q_len) = "
            f"{(batch, num_heads, q_len)}, as tiled_attention returns it"
        )
    if mask is not None and (mask.q_len, mask.k_len) != (q_len, k_len):
        raise ValueError(
            f"mask is {mask.q_len}x{mask.k_len} (q_len x k_len) but the inputs are {q_len}x{k_len}"
        )
    device = query.device
    row_idx = _positions("rows", rows, q_len, device)
    head_idx = _positions("heads", heads, num_heads, device)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32

    q = query[:, head_idx][:, :, row_idx].to(compute)  # (B, h, r, D)
    k = key[:, head_idx // (num_heads // kv_heads)].to(compute)  # (B, h, K, D)
    q_idx, k_idx = row_idx.view(1, 1, -1, 1), torch.arange(k_len, device=device).view(1, 1, 1, -1)
    allowed = None
    if mask is not None:
        b, h, _, _ = mask.indices(0, 0, 0, 0, device)
        allowed = mask.mask_mod(b, h, q_idx, k_idx)
        allowed = allowed.reshape((1,) * (4 - allowed.ndim) + tuple(allowed.shape))
        allowed = allowed[:, head_idx] if allowed.shape[1] > 1 else allowed
    selected = None
    if bias is not None:
        selected = bias.view(1, 1, *bias.shape) if bias.ndim == 2 else bias
        selected = selected if selected.shape[1] == 1 else selected[:, head_idx]
        selected = selected[..., row_idx, :]
    tile = combine_masks(allowed, selected)
    scores = _scores(q, k, scale)  # (B, h, r, K): only the requested rows and heads
    mod = chain(as_score_mod(score_mod), softcap_mod(softcap) if softcap else None)
    if mod is not None:
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        scores = mod(scores, b, head_idx.view(1, -1, 1, 1), q_idx, k_idx)
    if tile is not None:
        if tile.dtype == torch.bool:
            scores = scores.masked_fill(~tile, -torch.inf)
        else:
            scores = scores + tile.to(scores.dtype)
    row_lse = lse[:, head_idx][:, :, row_idx].unsqueeze(-1).to(compute)
    # A row that saw no key has lse −inf: use +inf, so that every weight in it is 0.
    return torch.exp(scores - row_lse.masked_fill(row_lse == -torch.inf, torch.inf))
