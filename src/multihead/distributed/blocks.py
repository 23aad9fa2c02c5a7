"""One block of ring attention: a rank's queries against one key/value shard.

The block runs on the tiled kernel's tiles (`multihead.kernels.tiled`), so its memory is
linear in the shard length, a causal block skips its empty tiles, and a run of full tiles
is one call of torch's fused CPU kernel. Unlike the tiled
kernel's autograd Function, the backward takes the *global* output and log-sum-exp of the
query rows (after every shard has been merged): then each block's probabilities are exactly
its slice of the softmax, and the blocks' gradients add up to the true ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import masks
from ..kernels import tiled


def _tiling(q_len: int, k_len: int, causal: bool) -> tiled.Tiling:
    # Read at call time, so a test can shrink the tiles.
    mask = masks.causal(q_len, k_len) if causal else None
    return tiled.Tiling.build(q_len, k_len, mask, None, tiled.BLOCK_Q, tiled.BLOCK_K)


def block_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool,
    scale: float,
    softcap: float | None,
) -> None:
    """Fold this block's keys into the running ``out`` (B, H, q, Dv) and ``lse`` (B, H, q, 1)
    of ``query``, in place (fp32, or fp64 for fp64 inputs). ``causal``: the block sits on
    the diagonal (query i of the block sees its keys 0..i). Only a row of tiles is held at
    a time, never a block-sized temporary."""
    heads = query.shape[1]
    tiling = _tiling(query.shape[2], key.shape[2], causal)
    q_blocks = tiled._blocks(query.shape[2], tiling.block_q)
    k_blocks = tiled._blocks(key.shape[2], tiling.block_k)
    merge = tiled._use_fused(query, value, softcap, None)
    for i, (q0, q1) in enumerate(q_blocks):
        outs, lses = [], []
        for k0, k1, j in tiling.spans(i, k_blocks, merge):
            mask = tiled._tile_mask(tiling, i, j, q0, q1, k0, k1, query.device)
            k = tiled._expand_heads(key[..., k0:k1, :], heads)
            v = tiled._expand_heads(value[..., k0:k1, :], heads)
            tile_out, tile_lse = tiled._tile_forward(
                query[..., q0:q1, :], k, v, mask, scale, softcap
            )
            outs.append(tile_out)
            lses.append(tile_lse)
        if len(outs) > 1:
            row_out, row_lse = torch.empty_like(outs[0]), torch.empty_like(lses[0])
            tiled._merge(outs, lses, row_out, row_lse)
            merge_into(out[..., q0:q1, :], lse[..., q0:q1, :], row_out, row_lse)
        elif outs:
            merge_into(out[..., q0:q1, :], lse[..., q0:q1, :], outs[0], lses[0])


def block_backward(
    grad_output: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    output: Tensor,
    lse: Tensor,
    d_query: Tensor,
    d_key: Tensor,
    d_value: Tensor,
    *,
    causal: bool,
    scale: float,
    softcap: float | None,
) -> None:
    """Add this block's share of the gradients to ``d_query``, ``d_key`` and ``d_value`` (in
    lse's dtype), in place; d_key and d_value are summed over each key/value head's query
    group (GQA). ``output`` and ``lse`` are the global ones of the query rows."""
    heads, kv_heads = query.shape[1], key.shape[1]
    compute = lse.dtype
    tiling = _tiling(query.shape[2], key.shape[2], causal)
    q_blocks = tiled._blocks(query.shape[2], tiling.block_q)
    k_blocks = tiled._blocks(key.shape[2], tiling.block_k)
    merge = tiled._use_fused(query, value, softcap, None)
    for i, (q0, q1) in enumerate(q_blocks):
        q, out, row_lse = query[..., q0:q1, :], output[..., q0:q1, :], lse[..., q0:q1, :]
        d_out = grad_output[..., q0:q1, :]
        for k0, k1, j in tiling.spans(i, k_blocks, merge):
            mask = tiled._tile_mask(tiling, i, j, q0, q1, k0, k1, query.device)
            k = tiled._expand_heads(key[..., k0:k1, :], heads)
            v = tiled._expand_heads(value[..., k0:k1, :], heads)
            d_q, d_k, d_v = tiled._tile_backward(d_out, q, k, v, out, row_lse, mask, scale, softcap)
            d_query[..., q0:q1, :] += d_q
            d_key[..., k0:k1, :] += tiled._sum_groups(d_k.to(compute), kv_heads)
            d_value[..., k0:k1, :] += tiled._sum_groups(d_v.to(compute), kv_heads)


def merge_into(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold one block's (output, lse) into the running ones, in place (``block_out`` is
    overwritten).

    out = out·exp(lse − new) + block_out·exp(block_lse − new), new = log(e^lse + e^block_lse):
    exact, in any order, so the shards can arrive in ring order.
    """
    total = torch.logaddexp(lse, block_lse)
    safe = total.masked_fill(total == -torch.inf, 0.0)  # rows no key has reached yet stay 0
    out.mul_(torch.exp(lse - safe)).add_(block_out.mul_(torch.exp(block_lse - safe)))
    lse.copy_(total)
