"""Caches for decoding one token at a time.

Without a cache, step t of generation recomputes the keys and values of all t earlier
tokens (O(t²) work per sequence). `KVCache` keeps them: each step projects only the new
token and appends its key and value. `SlidingWindowKVCache` keeps only the last ``window``
of them, for models that attend to a window (Mistral, Gemma): memory stays fixed however long
the generation. `CrossAttentionCache` holds the encoder memory's keys and values, which do
not change while decoding, so they are projected once per source.

Each implements `AttentionCache`, all that `MultiHeadAttention` asks of a cache: what to
project keys and values from, the position of the new queries, appending the new keys and
returning what the queries attend to (in the order the cache chooses), and the mask that goes
with it. `NoCache` is the same interface for a call without a cache.

Tensors are (batch, kv_heads, seq, head_dim), as everywhere inside the library.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import masks as masks_lib
from .masks import Mask

__all__ = [
    "AttentionCache",
    "CrossAttentionCache",
    "KVCache",
    "NoCache",
    "SlidingWindowKVCache",
]

CausalArg = bool | Literal["top-left", "bottom-right"]


@runtime_checkable
class AttentionCache(Protocol):
    """What `MultiHeadAttention` asks of a cache, in the order it asks.

    - ``prepare(query, key, value, causal)``: the inputs to project keys and values from
      (None where the cache holds them already) and the causal alignment of the new queries;
      refuses what the cache cannot serve.
    - ``offset``: the absolute position of the first new query (RoPE's offset).
    - ``update(key, value, mask=, position_bias=, weights=)``: store the new keys and values
      (projected, split into heads, rotated) and return all the queries attend to. The cache
      picks the order of the keys; the arguments say what reads keys by their place (a
      caller's mask, a position bias such as ALiBi or T5's, weights handed back).
    - ``mask(q_len, k_len)``: the cache's own mask over what ``update`` returned (a sliding
      window), or None.
    """

    @property
    def offset(self) -> int: ...

    def prepare(
        self, query: Tensor, key: Tensor | None, value: Tensor | None, causal: CausalArg
    ) -> tuple[Tensor | None, Tensor | None, CausalArg]: ...

    def update(
        self,
        key: Tensor | None,
        value: Tensor | None,
        *,
        mask: object = None,
        position_bias: bool = False,
        weights: bool = False,
    ) -> tuple[Tensor, Tensor]: ...

    def mask(self, q_len: int, k_len: int) -> Mask | None: ...


class NoCache:
    """`AttentionCache` for a call without a cache: keys and values come from the inputs
    (``key`` defaults to ``query``, ``value`` to ``key``) and nothing is stored."""

    offset = 0

    def prepare(
        self, query: Tensor, key: Tensor | None, value: Tensor | None, causal: CausalArg
    ) -> tuple[Tensor | None, Tensor | None, CausalArg]:
        key = query if key is None else key
        return key, key if value is None else value, causal

    def update(
        self,
        key: Tensor | None,
        value: Tensor | None,
        *,
        mask: object = None,
        position_bias: bool = False,
        weights: bool = False,
    ) -> tuple[Tensor, Tensor]:
        assert key is not None and value is not None
        return key, value

    def mask(self, q_len: int, k_len: int) -> Mask | None:
        return None

    def __repr__(self) -> str:
        return "NoCache()"


NO_CACHE = NoCache()


class _SelfAttentionCache:
    """What KVCache and SlidingWindowKVCache share: the new tokens are the queries, whose keys
    and values are appended; causal=True means bottom-right (they come after the cached ones)."""

    def prepare(
        self, query: Tensor, key: Tensor | None, value: Tensor | None, causal: CausalArg
    ) -> tuple[Tensor | None, Tensor | None, CausalArg]:
        if any(x is not None and x is not query for x in (key, value)):
            raise ValueError(
                f"a {type(self).__name__} is for self-attention: pass key=None and value=None"
            )
        if causal == "top-left":
            raise ValueError(
                f"causal='top-left' is wrong with a {type(self).__name__} (the new queries come "
                "after the cached keys); pass causal=True or 'bottom-right'"
            )
        return query, query, "bottom-right" if causal else False


def _buffers(
    sizes: dict[str, int], dtype: torch.dtype, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    """Zeroed key and value buffers of shape (batch, kv_heads, slots, head_dim), after checking
    that every size is a positive int."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_dtype(dtype)
    shape = tuple(sizes.values())
    return (
        torch.zeros(shape, dtype=dtype, device=device),
        torch.zeros(shape, dtype=dtype, device=device),
    )


class KVCache(_SelfAttentionCache):
    """One self-attention layer's keys and values so far, in preallocated buffers.

    The buffers are (batch, kv_heads, max_len, head_dim) and are written in place, so
    decoding allocates nothing per step; `append` returns views of the filled part.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        sizes = {"batch_size": batch_size, "num_kv_heads": num_kv_heads, "max_len": max_len}
        self.keys, self.values = _buffers({**sizes, "head_dim": head_dim}, dtype, device)
        self.length = 0

    @property
    def max_len(self) -> int:
        """How many positions the buffers hold (the ``max_len`` they were built with)."""
        return self.keys.shape[2]

    @property
    def offset(self) -> int:
        """The absolute position of the next token: how many are cached."""
        return self.length

    def update(
        self,
        key: Tensor | None,
        value: Tensor | None,
        *,
        mask: object = None,
        position_bias: bool = False,
        weights: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """`append` (the keys are always in order: they are the buffer's prefix)."""
        assert key is not None and value is not None
        return self.append(key, value)

    def mask(self, q_len: int, k_len: int) -> Mask | None:
        return None

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``key``/``value`` (batch, kv_heads, new, head_dim) after the cached ones.

        Returns the keys and values so far, (batch, kv_heads, length, head_dim), as views.
        """
        expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
        for name, x in (("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.ndim != 4 or (x.shape[0], x.shape[1], x.shape[3]) != expected:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)} but the cache holds "
                    f"(batch, kv_heads, seq, head_dim) = ({expected[0]}, {expected[1]}, seq, "
                    f"{expected[2]})"
                )
            _check_like_buffer(name, x, self.keys)
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"key has {key.shape[2]} positions but value has {value.shape[2]}")
        start, stop = self.length, self.length + key.shape[2]
        if stop > self.max_len:
            raise ValueError(
                f"KV cache overflow: it holds {self.length} of max_len={self.max_len} positions "
                f"and cannot take {key.shape[2]} more; build it with a larger max_len"
            )
        self.keys[:, :, start:stop] = key
        self.values[:, :, start:stop] = value
        self.length = stop
        return self.keys[:, :, :stop], self.values[:, :, :stop]

    def reorder(self, beam_indices: Tensor) -> None:
        """Row i becomes old row ``beam_indices[i]`` (beam search keeps the best beams)."""
        index = _check_index(beam_indices, self.keys.shape[0])
        n = self.length
        self.keys[:, :, :n] = self.keys[index, :, :n]
        self.values[:, :, :n] = self.values[index, :, :n]

    def reset(self) -> None:
        """Forget everything (the buffers are kept for the next sequence)."""
        self.length = 0

    def __repr__(self) -> str:
        b, h, m, d = self.keys.shape
        return f"KVCache(batch={b}, kv_heads={h}, length={self.length}/{m}, head_dim={d})"


class SlidingWindowKVCache(_SelfAttentionCache):
    """The last ``window`` keys and values of one self-attention layer, in a ring buffer.

    Position p is stored in slot p % window, so a step overwrites the oldest entry instead of
    shifting the others, and the buffers never grow. ``position`` counts every token ever
    appended: it is the absolute position of the next one (RoPE's offset), which keeps going
    after the buffer wraps around.

    `append` returns the keys still visible to the new queries in chronological order: the
    last ``window − 1`` cached ones, then the new ones. A query at absolute position p sees
    keys p − window + 1 .. p, which is ``masks.sliding_window(q_len, k_len, window,
    align="bottom-right")`` over what `append` returns (all of it for a single new token):
    `mask` gives it to `MultiHeadAttention`. Chronological order costs a copy of the window
    per step; it keeps the relative distances that ALiBi and relative biases read from
    (q_len, k_len) right. `update` decides: where nothing reads the keys by their place (one
    new token, no mask, no position bias, no weights handed back) it returns the buffer as it
    lies, in slot order, without a copy.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        window: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        sizes = {"batch_size": batch_size, "num_kv_heads": num_kv_heads, "window": window}
        self.keys, self.values = _buffers({**sizes, "head_dim": head_dim}, dtype, device)
        self.position = 0

    @property
    def window(self) -> int:
        """How many of the last positions are kept (the ring buffer's size)."""
        return self.keys.shape[2]

    @property
    def length(self) -> int:
        """How many positions the buffer holds: min(position, window)."""
        return min(self.position, self.window)

    @property
    def offset(self) -> int:
        """The absolute position of the next token (it keeps counting past the window)."""
        return self.position

    def _chronological(self, count: int) -> tuple[Tensor, Tensor]:
        """The last ``count`` (<= length) cached keys and values, oldest first."""
        slots = torch.arange(self.position - count, self.position, device=self.keys.device)
        slots = slots % self.window
        return self.keys[:, :, slots], self.values[:, :, slots]

    def _check(self, key: Tensor, value: Tensor) -> None:
        expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
        for name, x in (("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.ndim != 4 or (x.shape[0], x.shape[1], x.shape[3]) != expected:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)} but the cache holds "
                    f"(batch, kv_heads, seq, head_dim) = ({expected[0]}, {expected[1]}, seq, "
                    f"{expected[2]})"
                )
            _check_like_buffer(name, x, self.keys)
        if key.shape[2] != value.shape[2]:
            raise ValueError(f"key has {key.shape[2]} positions but value has {value.shape[2]}")

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``key``/``value`` (batch, kv_heads, new, head_dim); return what the new
        queries may see, (batch, kv_heads, min(length, window − 1) + new, head_dim), oldest
        first (see the class docstring for the mask that goes with it)."""
        self._check(key, value)
        old_keys, old_values = self._chronological(min(self.length, self.window - 1))
        keys = torch.cat([old_keys, key], dim=2)
        values = torch.cat([old_values, value], dim=2)
        new = key.shape[2]
        kept = min(new, self.window)  # of a long prompt only the last window positions stay
        slots = torch.arange(self.position + new - kept, self.position + new) % self.window
        slots = slots.to(self.keys.device)
        self.keys[:, :, slots] = key[:, :, new - kept :]
        self.values[:, :, slots] = value[:, :, new - kept :]
        self.position += new
        return keys, values

    def update(
        self,
        key: Tensor | None,
        value: Tensor | None,
        *,
        mask: object = None,
        position_bias: bool = False,
        weights: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """`append`, or for one new token that nothing reads by key position (no ``mask``,
        no ``position_bias``, no ``weights``) the buffer itself in slot order, no copy: one
        query sees every key it holds, and attention without a position bias does not depend
        on the order of the keys (RoPE is in the cached keys already)."""
        assert key is not None and value is not None
        if key.shape[2] != 1 or mask is not None or position_bias or weights:
            return self.append(key, value)
        self._check(key, value)
        slot = self.position % self.window
        self.keys[:, :, slot : slot + 1] = key
        self.values[:, :, slot : slot + 1] = value
        self.position += 1
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def mask(self, q_len: int, k_len: int) -> Mask | None:
        """The bottom-right sliding window over what `update` returned; None where a single
        query sees every key returned."""
        if q_len == 1 and k_len <= self.window:
            return None
        return masks_lib.sliding_window(q_len, k_len, window=self.window, align="bottom-right")

    def reorder(self, beam_indices: Tensor) -> None:
        """Row i becomes old row ``beam_indices[i]`` (beam search keeps the best beams)."""
        index = _check_index(beam_indices, self.keys.shape[0])
        self.keys.copy_(self.keys[index])
        self.values.copy_(self.values[index])

    def reset(self) -> None:
        """Forget everything (the buffers are kept for the next sequence)."""
        self.position = 0

    def __repr__(self) -> str:
        b, h, w, d = self.keys.shape
        return (
            f"SlidingWindowKVCache(batch={b}, kv_heads={h}, window={w}, head_dim={d}, "
            f"position={self.position})"
        )


class CrossAttentionCache:
    """The encoder memory's keys and values for one cross-attention layer.

    Empty when built; the first `MultiHeadAttention` call that gets it projects the memory
    and stores the result, later calls reuse it and skip the key/value projections.
    """

    offset = 0  # positions (RoPE, ALiBi, T5) are for self-attention only

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    @property
    def is_empty(self) -> bool:
        """True until the first call has projected and stored the memory."""
        return self.keys is None

    def prepare(
        self, query: Tensor, key: Tensor | None, value: Tensor | None, causal: CausalArg
    ) -> tuple[Tensor | None, Tensor | None, CausalArg]:
        """The memory to project on the first call (``value`` defaults to ``key``); nothing
        afterwards (a memory passed again is not read)."""
        if not self.is_empty:
            return None, None, causal
        if key is None:
            raise ValueError("an empty CrossAttentionCache needs key (the memory) to fill it")
        return key, key if value is None else value, causal

    def update(
        self,
        key: Tensor | None,
        value: Tensor | None,
        *,
        mask: object = None,
        position_bias: bool = False,
        weights: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Store the projected memory if given (the first call); return the stored one."""
        if key is not None and value is not None:
            self.store(key, value)
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def mask(self, q_len: int, k_len: int) -> Mask | None:
        return None

    def store(self, key: Tensor, value: Tensor) -> None:
        """Keep the projected memory, (batch, kv_heads, src_len, head_dim)."""
        self.keys, self.values = key, value

    def reorder(self, beam_indices: Tensor) -> None:
        """Row i becomes old row ``beam_indices[i]``."""
        if self.keys is None or self.values is None:
            return
        index = _check_index(beam_indices, self.keys.shape[0])
        self.keys, self.values = self.keys[index], self.values[index]

    def reset(self) -> None:
        """Forget the memory (for a new source)."""
        self.keys = self.values = None

    def __repr__(self) -> str:
        shape = None if self.keys is None else tuple(self.keys.shape)
        return f"CrossAttentionCache({'empty' if shape is None else shape})"


def _check_dtype(dtype: object) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _check_like_buffer(name: str, x: Tensor, buffer: Tensor) -> None:
    """No silent casts or copies across devices: new entries match the cache's buffers."""
    if x.dtype != buffer.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the cache holds {buffer.dtype}")
    if x.device != buffer.device:
        raise ValueError(f"{name} is on {x.device} but the cache is on {buffer.device}")


def _check_index(beam_indices: object, batch: int) -> Tensor:
    if not isinstance(beam_indices, Tensor):
        raise TypeError(f"beam_indices must be a torch.Tensor, got {type(beam_indices).__name__}")
    if beam_indices.dtype.is_floating_point or beam_indices.dtype == torch.bool:
        raise TypeError(f"beam_indices must be an integer tensor, got {beam_indices.dtype}")
    if beam_indices.shape != (batch,):
        raise ValueError(
            f"beam_indices must have shape ({batch},), one source row per cache row, "
            f"got {tuple(beam_indices.shape)}"
        )
    if batch and (int(beam_indices.min()) < 0 or int(beam_indices.max()) >= batch):
        raise ValueError(f"beam_indices must be rows in [0, {batch}), got {beam_indices.tolist()}")
    return beam_indices
