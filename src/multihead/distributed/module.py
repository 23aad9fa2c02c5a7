"""`RingAttention`: a `MultiHeadAttention` whose self-attention spans every rank's shard.

Everything in a Transformer layer except attention works position by position, so a layer
runs on a sharded sequence once its attention does: wrap the layer's ``self_attn`` and feed
each rank its shard (`shard_sequence`). The projections are the wrapped module's own (same
parameters, so an optimizer or DDP sees no difference); in a state dict they appear under
``attention.``.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from ..multi_head_attention import MultiHeadAttention, refuse_beyond_self_attention
from .ring import Layout, Ring, ring_attention

__all__ = ["RingAttention"]


class RingAttention(nn.Module):
    """Self-attention of a `MultiHeadAttention` over a sequence sharded across ``group``.

    Takes (batch, shard_len, embed_dim), this rank's shard, and returns the same shape.
    ``zigzag`` must say how the sequence was sharded. RoPE gets each token's global position;
    ALiBi/relative biases, masks other than causal, caches, weights and attention dropout
    while training are refused.
    """

    def __init__(
        self,
        attention: MultiHeadAttention,
        *,
        group: dist.ProcessGroup | None = None,
        zigzag: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(attention, MultiHeadAttention):
            raise TypeError(
                f"attention must be a MultiHeadAttention, got {type(attention).__name__}"
            )
        if attention.positions not in (None, "rope"):
            raise ValueError(
                f"positions={attention.positions!r} adds a dense score bias, which ring "
                "attention does not support (use None or 'rope')"
            )
        self.attention = attention
        self.group = group
        self.zigzag = zigzag

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: object = None,
        causal: bool | str = False,
        need_weights: object = False,
        cache: object = None,
    ) -> Tensor:
        """query (batch, shard_len, embed_dim): this rank's shard → its output shard."""
        refuse_beyond_self_attention(
            "RingAttention (sharded self-attention)", query, key, value, mask, need_weights, cache
        )
        if causal not in (False, True, "top-left", "bottom-right"):
            raise ValueError(
                f"causal must be True, False, 'top-left' or 'bottom-right', got {causal!r}"
            )
        mha = self.attention
        if mha.training and mha.dropout > 0:
            raise ValueError(
                f"attention dropout ({mha.dropout}) is not supported by ring attention; "
                "build the layer with dropout=0 or call eval()"
            )
        q, k, v = mha.project_heads(query, query, query)
        if mha.rotary is not None:  # RoPE needs the tokens' places in the whole sequence
            ring = Ring.of(self.group)
            positions = Layout.gather(q, k, v, ring, self.zigzag).positions(ring.rank, q.device)
            q, k = mha.rotate(q, k, positions=positions)
        # Query and key lengths are equal, so bottom-right causal is top-left causal.
        out = ring_attention(
            q, k, v, group=self.group, causal=bool(causal), zigzag=self.zigzag, softcap=mha.softcap
        )
        return mha.out_proj(mha.merge_heads(out))

    def extra_repr(self) -> str:
        return f"zigzag={self.zigzag}"
