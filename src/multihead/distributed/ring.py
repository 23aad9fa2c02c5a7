"""Ring attention (Liu et al., 2023): attention over a sequence sharded across ranks.

Each rank holds the queries, keys and values of its shard of the sequence. The key/value
shards travel around the ring (rank r sends to r+1 and receives from r−1) while every rank
attends from its queries to the shard it holds; after world steps each query has seen
every key. Each step yields a partial output and its log-sum-exp, and partials merge
exactly (`blocks.merge_into`), so the result is the attention of the whole sequence, not an
approximation. The transfer of the next shard is started before the current one is
computed, so communication overlaps compute where the backend runs it in the background
(gloo and NCCL do).

Backward is the same ring: the key/value shards travel again, each with the gradient
accumulators of its keys and values; every rank adds its queries' contribution, and one
last hop brings each accumulator home. Memory per rank is linear in the shard length.

Causal attention on contiguous shards leaves the first rank idle while the last one works
on every shard; the zigzag layout (`shard.py`) gives every rank an early and a late chunk,
so each ring step costs every rank the same (the layout of zhuzilin's ring-flash-attention
and of Llama 3's context parallelism, Dubey et al., 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .blocks import block_backward, block_forward
from .shard import shard_intervals

__all__ = ["ring_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KV_TAG, _GRAD_TAG = 0, 2  # key, value; d_key, d_value: two transfers in flight at once


@dataclass(frozen=True)
class Ring:
    """This rank's place in the ring: who it sends to and who it receives from."""

    group: dist.ProcessGroup
    rank: int
    world: int

    @staticmethod
    def of(group: dist.ProcessGroup | None) -> Ring:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ring attention needs torch.distributed: call "
                "torch.distributed.init_process_group first"
            )
        group = dist.group.WORLD if group is None else group
        return Ring(group, dist.get_rank(group), dist.get_world_size(group))

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world)

    def exchange(self, send: list[Tensor], recv: list[Tensor], tag: int) -> list[dist.Work]:
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous."""
        ops = [
            dist.P2POp(dist.isend, t, self._peer(1), self.group, tag + i)
            for i, t in enumerate(send)
        ]
        ops += [
            dist.P2POp(dist.irecv, t, self._peer(-1), self.group, tag + i)
            for i, t in enumerate(recv)
        ]
        return dist.batch_isend_irecv(ops)


@dataclass(frozen=True)
class Layout:
    """Which global positions every rank holds: (start, stop) chunks per rank, local order."""

    chunks: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def lengths(self) -> list[int]:
        return [sum(b - a for a, b in chunks) for chunks in self.chunks]

    def positions(self, rank: int, device: torch.device | None = None) -> Tensor:
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.chunks[rank]])

    @staticmethod
    def gather(query: Tensor, key: Tensor, value: Tensor, ring: Ring, zigzag: bool) -> Layout:
        """All-gather every rank's shapes and check they fit together.

        Every rank receives the same shapes, so a mismatch raises the same error on all of
        them instead of leaving some waiting for a transfer that never comes.
        """
        mine = [query.shape[2], *query.shape[:2], key.shape[1], query.shape[3], value.shape[3]]
        mine.append(_DTYPES.index(query.dtype))
        local = torch.tensor(mine, dtype=torch.int64, device=query.device)
        gathered = [torch.empty_like(local) for _ in range(ring.world)]
        dist.all_gather(gathered, local, group=ring.group)
        rows = [[int(x) for x in row] for row in gathered]
        names = ("batch", "heads", "kv_heads", "head_dim", "value_dim", "dtype")
        for name, index in zip(names, range(1, 7), strict=True):
            values = [row[index] for row in rows]
            if len(set(values)) > 1:
                if name == "dtype":
                    values = [str(_DTYPES[v]) for v in values]
                raise ValueError(f"the ranks' shards must agree in {name}, got {values} by rank")
        lengths = [row[0] for row in rows]
        if min(lengths) < 1:
            raise ValueError(f"every rank needs at least one position, got lengths {lengths}")
        if not zigzag:  # any lengths: rank r holds the positions after rank r-1's
            starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
            return Layout(tuple(((starts[r], starts[r + 1]),) for r in range(ring.world)))
        chunks = tuple(
            tuple(shard_intervals(sum(lengths), r, ring.world, True)) for r in range(ring.world)
        )
        layout = Layout(chunks)
        if layout.lengths != lengths:
            raise ValueError(
                f"the shards hold {lengths} positions by rank, but a zigzag split of "
                f"{sum(lengths)} over {ring.world} ranks holds {layout.lengths}: shard with "
                "multihead.distributed.shard_sequence(..., zigzag=True)"
            )
        return layout


def _blocks(
    q_chunks: tuple[tuple[int, int], ...], k_chunks: tuple[tuple[int, int], ...], causal: bool
) -> list[tuple[slice, slice, bool]]:
    """(local query rows, local key rows, on the diagonal) of the blocks to compute.

    Chunks are disjoint runs of positions, so under a causal mask a pair of chunks is
    either the same chunk (causal within it), all earlier keys (full) or all later (skipped).
    """
    if not causal:
        return [(slice(None), slice(None), False)]
    blocks = []
    q_offset = 0
    for a, b in q_chunks:
        k_offset = 0
        for c, d in k_chunks:
            rows, cols = slice(q_offset, q_offset + b - a), slice(k_offset, k_offset + d - c)
            if (a, b) == (c, d):
                blocks.append((rows, cols, True))
            elif d <= a:
                blocks.append((rows, cols, False))
            k_offset += d - c
        q_offset += b - a
    return blocks


def _wait(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        ring: Ring,
        layout: Layout,
        causal: bool,
        scale: float,
        softcap: float | None,
    ) -> Tensor:
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
        out = query.new_zeros(*query.shape[:3], value.shape[-1], dtype=compute)
        lse = query.new_full((*query.shape[:3], 1), -torch.inf, dtype=compute)
        k, v = key.contiguous(), value.contiguous()
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            pending: list[dist.Work] = []
            if step + 1 < ring.world:  # the next shard travels while this one is computed
                n = layout.lengths[(ring.rank - step - 1) % ring.world]
                next_k = k.new_empty(*k.shape[:2], n, k.shape[3])
                next_v = v.new_empty(*v.shape[:2], n, v.shape[3])
                pending = ring.exchange([k, v], [next_k, next_v], _KV_TAG)
            for rows, cols, diagonal in _blocks(
                layout.chunks[ring.rank], layout.chunks[source], causal
            ):
                block_forward(
                    query[..., rows, :],
                    k[..., cols, :],
                    v[..., cols, :],
                    out[..., rows, :],
                    lse[..., rows, :],
                    causal=diagonal,
                    scale=scale,
                    softcap=softcap,
                )
            if pending:
                _wait(pending)
                k, v = next_k, next_v
        output = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.ring, ctx.layout, ctx.causal = ring, layout, causal
        ctx.scale, ctx.softcap = scale, softcap
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        query, key, value, output, lse = ctx.saved_tensors
        ring, layout = ctx.ring, ctx.layout
        grad_output = grad_output.contiguous()
        compute = lse.dtype
        d_query = torch.zeros(query.shape, dtype=compute, device=query.device)
        k, v = key.contiguous(), value.contiguous()
        grads_in_flight: list[dist.Work] = []
        received: list[Tensor] = []  # d_key, d_value sums arriving from the previous rank
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            next_n = layout.lengths[(ring.rank - step - 1) % ring.world]
            kv_in_flight: list[dist.Work] = []
            if step + 1 < ring.world:
                next_k = k.new_empty(*k.shape[:2], next_n, k.shape[3])
                next_v = v.new_empty(*v.shape[:2], next_n, v.shape[3])
                kv_in_flight = ring.exchange([k, v], [next_k, next_v], _KV_TAG)
            if grads_in_flight:
                # The previous ranks' sums for the shard held now. Adding to them in place,
                # rather than to a fresh pair added later, holds one pair fewer per rank;
                # this transfer (a hop of the same size as the key/value one, overlapped
                # above) is the one left in the open.
                _wait(grads_in_flight)
                d_key, d_value = received
            else:
                d_key = torch.zeros(k.shape, dtype=compute, device=k.device)
                d_value = torch.zeros(v.shape, dtype=compute, device=v.device)
            for rows, cols, diagonal in _blocks(
                layout.chunks[ring.rank], layout.chunks[source], ctx.causal
            ):
                block_backward(
                    grad_output[..., rows, :],
                    query[..., rows, :],
                    k[..., cols, :],
                    v[..., cols, :],
                    output[..., rows, :],
                    lse[..., rows, :],
                    d_query[..., rows, :],
                    d_key[..., cols, :],
                    d_value[..., cols, :],
                    causal=diagonal,
                    scale=ctx.scale,
                    softcap=ctx.softcap,
                )
            if kv_in_flight:
                _wait(kv_in_flight)
                k, v = next_k, next_v
            if ring.world > 1:  # pass the sums on; after the last step they reach the owner
                received = [d.new_empty(*d.shape[:2], next_n, d.shape[3]) for d in (d_key, d_value)]
                grads_in_flight = ring.exchange([d_key, d_value], received, _GRAD_TAG)
        if grads_in_flight:
            _wait(grads_in_flight)
            d_key, d_value = received
        return (
            d_query.to(query.dtype),
            d_key.to(key.dtype),
            d_value.to(value.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _check_inputs(query: object, key: object, value: object) -> None:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(x.shape)}"
            )
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    assert isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but query has {query.dtype}")
        if x.shape[0] != query.shape[0] or x.shape[2] != query.shape[2]:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but query has {tuple(query.shape)}: the "
                "shards must hold the same batch and the same positions"
            )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key has head_dim {key.shape[-1]} but query has {query.shape[-1]}")
    if key.shape[1] != value.shape[1] or query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"key and value have {key.shape[1]} and {value.shape[1]} heads: they must agree "
            f"and divide the query's {query.shape[1]} (grouped-query attention)"
        )


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    zigzag: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Self-attention over a sequence sharded across the ranks of ``group``.

    Args:
        query, key, value: this rank's shard, (batch, heads | kv_heads, shard_len, dim), the
            same positions in all three (see `shard_sequence`). Key/value heads may divide
            the query heads (GQA).
        group: the process group forming the ring (default: the world).
        causal: each position sees only the positions at or before it in the whole sequence.
        zigzag: the shards are zigzag ones (``shard_sequence(..., zigzag=True)``), which
            balance causal work; otherwise rank r holds the r-th contiguous piece (any
            lengths).
        scale: score scale, default 1/sqrt(head_dim). softcap: scores become
            softcap·tanh(scores/softcap).

    Returns this rank's shard of the output, (batch, heads, shard_len, value_dim). Every rank
    of the group must make the same call (and, when training, run backward). Attention
    dropout and masks other than causal are not supported.
    """
    _check_inputs(query, key, value)
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    ring = Ring.of(group)
    layout = Layout.gather(query, key, value, ring, zigzag)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(query, key, value, ring, layout, bool(causal), scale, softcap)
