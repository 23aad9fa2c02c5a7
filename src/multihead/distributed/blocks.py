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
    tiling = _tiling(query.shape[2], key.shape[2], causal)
    for i, (q0, q1) in enumerate(tiled._blocks(query.shape[2], tiling.block_q)):
        outs, lses, _ = tiled.row_tiles(query, key, value, tiling, i, scale, softcap)
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
    tiled.accumulate_gradients(
        grad_output, query, key, value, output, lse, d_query, d_key, d_value,
        _tiling(query.shape[2], key.shape[2], causal), scale, softcap,
    )  # fmt: skip


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
