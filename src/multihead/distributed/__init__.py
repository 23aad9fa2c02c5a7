"""Context parallelism: attention over a sequence sharded across torch.distributed ranks.

`shard_sequence` cuts a sequence into per-rank shards (contiguous, or zigzag for balanced
causal work); `ring_attention` attends over the whole sequence from each shard, passing
key/value shards around the ring; `RingAttention` wraps a `MultiHeadAttention` so a
Transformer layer runs on a shard; `gather_sequence` puts the shards back together.
"""

from .module import RingAttention
from .ring import ring_attention
from .shard import (
    gather_sequence,
    shard_intervals,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "RingAttention",
    "gather_sequence",
    "ring_attention",
    "shard_intervals",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
