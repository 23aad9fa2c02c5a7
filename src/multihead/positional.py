"""Position information for attention, which by itself is blind to order.

`SinusoidalPositions` and `LearnedPositions` add a position vector to each token vector
(batch, seq, d_model). The others act inside attention, on relative positions:
`RotaryEmbedding` (RoPE) rotates each head's queries and keys, `ALiBi` and
`RelativePositionBias` (T5) add a bias to the scores. ``offset`` is the position of the
first token: when decoding with a KV cache only the newest token is fed, and it must get its
true position, not position 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "ALiBi",
    "LearnedPositions",
    "RelativePositionBias",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "alibi_bias",
    "alibi_slopes",
    "relative_position_bucket",
]


def _check_span(x: Tensor, offset: int, max_len: int, d_model: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D (batch, seq, d_model), got shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"x has {x.shape[-1]} features but the positions have d_model={d_model}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if offset + x.shape[1] > max_len:
        raise ValueError(
            f"positions {offset}..{offset + x.shape[1] - 1} are needed but max_len is {max_len}: "
            "shorten the sequence or build the model with a larger max_len"
        )


def _check_positions(positions: object, x: Tensor) -> Tensor:
    """Per-token positions, (seq,) or (batch, seq), for rows whose positions are not a range:
    packed documents restart at 0, so each gets the positions it would have alone.

    Their values are not read here (no host sync in a forward pass); one past the table fails
    in the indexing.
    """
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    if positions.dtype == torch.bool:
        raise TypeError("positions must be an integer tensor, got torch.bool")
    if positions.shape not in ((x.shape[1],), (x.shape[0], x.shape[1])):
        raise ValueError(
            f"positions must be (seq,) or (batch, seq) = {(x.shape[0], x.shape[1])}, "
            f"got shape {tuple(positions.shape)}"
        )
    return positions.to(x.device)


def sinusoid_table(max_len: int, d_model: int) -> Tensor:
    """The paper's table: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]
    return table.float()


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al., 2017, §3.5): no parameters to learn.

    The table is a non-persistent buffer: it is rebuilt from (max_len, d_model), so it never
    lands in a checkpoint.
    """

    pe: Tensor

    def __init__(self, d_model: int, max_len: int = 512) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_model, self.max_len = d_model, max_len
        self.register_buffer("pe", sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """x + PE[offset : offset + seq], or x + PE[positions] (see `_check_positions`)."""
        _check_span(x, offset, self.max_len, self.d_model)
        if positions is not None:
            return x + self.pe[_check_positions(positions, x)].to(x.dtype)
        return x + self.pe[offset : offset + x.shape[1]].to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositions(nn.Module):
    """One learned vector per position (BERT, GPT-2): positions past max_len do not exist."""

    def __init__(self, d_model: int, max_len: int = 512, init_std: float = 0.02) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_model, self.max_len = d_model, max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """x + P[offset : offset + seq], or x + P[positions] (see `_check_positions`)."""
        _check_span(x, offset, self.max_len, self.d_model)
        if positions is not None:
            return x + self.embedding.weight[_check_positions(positions, x)].to(x.dtype)
        return x + self.embedding.weight[offset : offset + x.shape[1]].to(x.dtype)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def relative_distances(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """(q_len, k_len) int64: key position − query position, queries aligned bottom-right.

    Query i sits at position i + (k_len − q_len): the new queries of a decoding step come
    after the cached keys. Without a cache q_len == k_len and this is plain j − i.
    """
    q = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    k = torch.arange(k_len, device=device).unsqueeze(0)
    return k - q


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, RoPE (Su et al., 2021, "RoFormer").

    Each pair of features of a query or key at position m is rotated by the angle m·θ_i,
    θ_i = base^(−2i/head_dim). A rotation by m·θ then by −n·θ is one by (m − n)·θ, so the
    score q_m·k_n depends on the positions only through m − n. Features are paired as
    (i, i + head_dim/2), as GPT-NeoX and Llama do (the paper pairs (2i, 2i+1); the two
    differ by a fixed permutation of the features).

    Apply it to (batch, heads, seq, head_dim) queries and keys after the projections and
    before a KV cache stores the keys, with ``offset`` = the cached length when decoding.
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_positive("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(
                f"head_dim must be even for RoPE (features rotate in pairs), got {head_dim}"
            )
        if isinstance(base, bool) or not isinstance(base, int | float) or not base > 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.head_dim, self.base = head_dim, float(base)
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate ``x`` (..., seq, head_dim) for positions ``offset + arange(seq)``.

        ``positions`` (seq,) or (batch, seq) overrides them, e.g. positions restarting at 0
        in each sequence of a packed batch.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must be (..., seq, head_dim={self.head_dim}), got shape {tuple(x.shape)}"
            )
        seq = x.shape[-2]
        if positions is None:
            _check_count("offset", offset)
            positions = torch.arange(offset, offset + seq, device=x.device)
        elif not isinstance(positions, Tensor) or positions.shape[-1] != seq:
            shape = tuple(positions.shape) if isinstance(positions, Tensor) else positions
            raise ValueError(
                f"positions must be (seq,) or (batch, seq) with seq={seq}, got {shape}"
            )
        # Angles in float64: m·θ for large m loses the low bits in float32.
        angles = positions.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(x.device)
        angles = torch.cat([angles, angles], dim=-1)  # (..., seq, head_dim)
        if positions.ndim == 2 and x.ndim == 4:  # (batch, seq) → (batch, 1, seq, head_dim)
            angles = angles.unsqueeze(1)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = angles.cos().to(compute), angles.sin().to(compute)
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.to(compute) * cos + rotated * sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"


def alibi_slopes(num_heads: int) -> Tensor:
    """The per-head slopes of ALiBi (Press et al., 2022, "Train Short, Test Long").

    For n heads, n a power of 2: the geometric sequence 2^(−8/n), 2^(−16/n), ..., 2^(−8).
    Otherwise (the authors' code): the slopes of the nearest power of 2 below, m, followed by
    every other slope of 2m heads, until there are n.
    """
    _check_positive("num_heads", num_heads)

    def power_of_2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_2(closest)
    if closest < num_heads:
        slopes += power_of_2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_bias(
    num_heads: int,
    q_len: int,
    k_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """ALiBi's additive score bias, (1, num_heads, q_len, k_len): −slope_h · |i − j|.

    The paper adds −m·(i − j) for the keys j ≤ i a causal query sees; the absolute distance
    gives the same there and a symmetric bias for bidirectional attention. Queries are aligned
    bottom-right (see `relative_distances`), so a decoding step gets its true distances.
    """
    _check_count("q_len", q_len)
    _check_count("k_len", k_len)
    distance = relative_distances(q_len, k_len, torch.device(device) if device else None)
    slopes = alibi_slopes(num_heads).to(distance.device)
    return (-slopes.view(-1, 1, 1) * distance.abs()).unsqueeze(0).to(dtype)


class ALiBi(nn.Module):
    """Attention with Linear Biases: no position embeddings, a distance penalty per head.

    Nothing is learned; heads with small slopes look far, heads with large slopes look near.
    """

    slopes: Tensor

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = _check_positive("num_heads", num_heads)
        self.register_buffer("slopes", alibi_slopes(num_heads).float(), persistent=False)

    def forward(self, q_len: int, k_len: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The bias (1, num_heads, q_len, k_len) to add to the scores."""
        _check_count("q_len", q_len)
        _check_count("k_len", k_len)
        distance = relative_distances(q_len, k_len, self.slopes.device).abs()
        return (-self.slopes.view(-1, 1, 1).to(dtype) * distance).unsqueeze(0)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


def relative_position_bucket(
    relative_position: Tensor,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """T5's buckets for key − query distances (Raffel et al., 2020, §2.1).

    Half the buckets hold one exact distance each (0, 1, 2, ...); the rest grow
    logarithmically up to ``max_distance``, beyond which all distances share the last bucket:
    near words need precise positions, far ones only roughly. ``bidirectional`` splits the
    buckets between keys before and after the query; otherwise keys after it share bucket 0
    (a causal model never sees them).
    """
    if relative_position.dtype.is_floating_point:
        raise TypeError(
            f"relative_position must be an integer tensor, got {relative_position.dtype}"
        )
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: one scalar per (bucket, head), added to the scores.

    The bias of query i and key j is ``embedding[bucket(j − i), head]``, with queries aligned
    bottom-right (see `relative_distances`), so decoding with a cache sees the same distances
    as the full sequence.
    """

    def __init__(
        self,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        *,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = _check_positive("num_heads", num_heads)
        self.num_buckets = _check_positive("num_buckets", num_buckets)
        self.max_distance = _check_positive("max_distance", max_distance)
        min_buckets = 4 if bidirectional else 2
        if num_buckets < min_buckets:
            raise ValueError(f"num_buckets must be >= {min_buckets}, got {num_buckets}")
        if max_distance <= num_buckets // (4 if bidirectional else 2):
            raise ValueError(
                f"max_distance ({max_distance}) must exceed the exact range "
                f"({num_buckets // (4 if bidirectional else 2)} positions)"
            )
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        """The bias (1, num_heads, q_len, k_len) to add to the scores."""
        _check_count("q_len", q_len)
        _check_count("k_len", k_len)
        distance = relative_distances(q_len, k_len, self.embedding.weight.device)
        buckets = relative_position_bucket(
            distance,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )
