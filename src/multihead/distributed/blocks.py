"""One block of ring attention: a rank's queries against one key/value shard.

The block runs on the online-softmax engine (`multihead.kernels.online_softmax`), as the
tiled kernel does, so its memory is linear in the shard length, a causal block skips its
empty tiles, and a run of full tiles is one call of torch's fused CPU kernel. Unlike the tiled
kernel's autograd Function, the backward takes the *global* output and log-sum-exp of the
query rows (after every shard has been merged): then each block's probabilities are exactly
its slice of the softmax, and the blocks' gradients add up to the true ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import masks, score_mods
from ..kernels import online_softmax as engine
from ..kernels.online_softmax import Plan
from ..score_mods import ScoreMod


def _plan(q_len: int, k_len: int, causal: bool) -> Plan:
    mask = masks.causal(q_len, k_len) if causal else None
    return Plan.build(q_len, k_len, mask, None)


def _mod(softcap: float | None) -> ScoreMod | None:
    return score_mods.softcap(softcap) if softcap is not None else None


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
    the diagonal (query i of the block sees its keys 0..i). Memory stays linear in the
    shard length: the engine holds one row block's spans at a time."""
    block_out = torch.zeros_like(out)
    block_lse = torch.full_like(lse, -torch.inf)
    plan = _plan(query.shape[2], key.shape[2], causal)
    engine.attend_rows(query, key, value, plan, block_out, block_lse, _mod(softcap), scale)
    merge_into(out, lse, block_out, block_lse)


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
    engine.accumulate_gradients(
        grad_output, query, key, value, output, lse, (d_query, d_key, d_value),
        _plan(query.shape[2], key.shape[2], causal), _mod(softcap), scale,
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
