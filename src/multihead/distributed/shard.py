"""Cut a sequence into per-rank shards for context parallelism, and put it back together.

Contiguous: rank r holds the r-th of ``world`` pieces. Zigzag: the sequence is cut into
2·world chunks and rank r holds chunks r and 2·world−1−r, so under a causal mask every rank
has the same amount of work (an early chunk sees few keys, its partner at the end sees
many). A length that does not divide splits as `torch.tensor_split` does: the first
``length % chunks`` chunks are one position longer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "gather_sequence",
    "shard_intervals",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]


def _check(seq_len: int, rank: int, world: int, zigzag: bool) -> int:
    """The number of chunks, after checking that every one of them holds a position."""
    for name, value in (("seq_len", seq_len), ("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    chunks = 2 * world if zigzag else world
    if seq_len < chunks:
        layout = f"a zigzag layout over {world} ranks cuts it into {chunks} chunks"
        if not zigzag:
            layout = f"{world} ranks need a position each"
        raise ValueError(f"the sequence has {seq_len} positions but {layout}; use fewer ranks")
    return chunks


def _chunk(seq_len: int, chunks: int, index: int) -> tuple[int, int]:
    """Global [start, stop) of chunk ``index``, split as torch.tensor_split does."""
    size, extra = divmod(seq_len, chunks)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def shard_intervals(seq_len: int, rank: int, world: int, zigzag: bool) -> list[tuple[int, int]]:
    """The global [start, stop) position ranges a rank holds, in its local order."""
    chunks = _check(seq_len, rank, world, zigzag)
    if not zigzag:
        return [_chunk(seq_len, chunks, rank)]
    return [_chunk(seq_len, chunks, rank), _chunk(seq_len, chunks, chunks - 1 - rank)]


def shard_positions(
    seq_len: int, rank: int, world: int, *, zigzag: bool = False, device=None
) -> Tensor:
    """Global positions (int64) of a rank's shard, e.g. for rotary embeddings."""
    intervals = shard_intervals(seq_len, rank, world, zigzag)
    return torch.cat([torch.arange(a, b, device=device) for a, b in intervals])


def shard_sequence(
    x: Tensor, rank: int, world: int, *, dim: int = -2, zigzag: bool = False
) -> Tensor:
    """The part of ``x`` that ``rank`` holds (a copy). ``dim`` is the sequence dimension:
    -2 fits both (batch, seq, embed) and (batch, heads, seq, head_dim)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    intervals = shard_intervals(x.shape[dim], rank, world, zigzag)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in intervals], dim=dim)


def unshard_sequence(shards: list[Tensor], *, dim: int = -2, zigzag: bool = False) -> Tensor:
    """The whole sequence from every rank's shard (in rank order): the inverse of
    `shard_sequence`."""
    world = len(shards)
    seq_len = sum(shard.shape[dim] for shard in shards)
    pieces: list[tuple[int, Tensor]] = []
    for rank, shard in enumerate(shards):
        intervals = shard_intervals(seq_len, rank, world, zigzag)
        if shard.shape[dim] != sum(b - a for a, b in intervals):
            raise ValueError(
                f"shard {rank} has {shard.shape[dim]} positions along dim {dim}, but a "
                f"{'zigzag' if zigzag else 'contiguous'} split of {seq_len} over {world} ranks "
                f"gives it {sum(b - a for a, b in intervals)}"
            )
        offset = 0
        for a, b in intervals:
            pieces.append((a, shard.narrow(dim, offset, b - a)))
            offset += b - a
    return torch.cat([piece for _, piece in sorted(pieces, key=lambda item: item[0])], dim=dim)


def gather_sequence(
    x: Tensor, *, group: dist.ProcessGroup | None = None, dim: int = -2, zigzag: bool = False
) -> Tensor:
    """Every rank's shard, all-gathered and put back in order (not differentiable).

    Shards may differ in length by one position; they are padded to the longest for the
    collective and trimmed after it.
    """
    world = dist.get_world_size(group)
    length = torch.tensor([x.shape[dim]], dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n) for n in lengths]
    padded = list(x.shape)
    padded[dim] = max(sizes)
    buffer = x.new_zeros(padded)
    buffer.narrow(dim, 0, x.shape[dim]).copy_(x.detach())
    gathered = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(gathered, buffer, group=group)
    shards = [g.narrow(dim, 0, n) for g, n in zip(gathered, sizes, strict=True)]
    return unshard_sequence(shards, dim=dim, zigzag=zigzag)
