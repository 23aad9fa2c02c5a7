"""Score modifiers: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``.

A score mod changes each attention score before the softmax, as a function of the score and
its position: ALiBi's distance penalty, T5's learned relative bias, soft-capping. Kernels
apply it where they work (the reference kernel on its score matrix, the tiled kernel tile by
tile, forward and backward), so no N×N bias is ever built.

A plain function works as it is. A `ScoreMod` says more, which kernels use:

- ``tensors``: tensors the function reads whose gradients the tiled kernel must return
  (T5's bias table); a plain function's captured tensors get no gradient from it.
- ``bias(...)``: when the mod only adds a bias, the bias of a tile, so the tile can run on
  torch's fused kernel (which takes an additive mask) instead of written-out steps.
- ``separable``: the bias splits into a per-row and a per-key part, so a tile costs
  (rows + keys) values instead of rows × keys (ALiBi: slope·(k − q)).

The index tensors are shaped for broadcasting, as for a mask_mod: b (B,1,1,1), h (1,H,1,1),
q_idx (1,1,Q,1), kv_idx (1,1,1,K); score is (B, H, Q, K).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .positional import alibi_slopes, relative_position_bucket

__all__ = [
    "ALiBi",
    "Chain",
    "RelativeBias",
    "ScoreMod",
    "ScoreModFn",
    "SoftCap",
    "alibi",
    "as_score_mod",
    "chain",
    "relative_bias",
    "softcap",
]

ScoreModFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""A score mod as a plain function: ``score_mod(score, b, h, q_idx, kv_idx) -> score``."""


class ScoreMod:
    """A score mod with what a kernel can use beyond calling it (see the module docstring)."""

    name: str = "score_mod"
    tensors: tuple[Tensor, ...] = ()
    additive: bool = False

    def __init__(self, fn: ScoreModFn, *, tensors: Sequence[Tensor] = (), name: str = "") -> None:
        if not callable(fn):
            raise TypeError(f"score_mod must be callable, got {type(fn).__name__}")
        for tensor in tensors:
            if not isinstance(tensor, Tensor):
                raise TypeError(f"tensors must be tensors, got {type(tensor).__name__}")
        self.fn = fn
        self.tensors = tuple(tensors)
        self.name = name or getattr(fn, "__name__", "score_mod")

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.fn(score, b, h, q, k)

    def bias(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """The additive bias (1|B, H|1, Q|1, K|1) of an ``additive`` mod."""
        raise NotImplementedError(f"{self.name} is not an additive score mod")

    def bias_parts(
        self, h: Tensor, q: Tensor, k: Tensor, bounds: tuple[int, int, int, int]
    ) -> tuple[Tensor, Tensor] | None:
        """(row part (.., Q, 1), key part (.., 1, K)) whose sum is the bias over this tile,
        or None when it does not split there. ``bounds``: the tile's (q0, q1, k0, k1)."""
        return None

    def __repr__(self) -> str:
        return f"ScoreMod({self.name})"


def as_score_mod(fn: ScoreModFn | ScoreMod | None) -> ScoreMod | None:
    """A plain function wrapped as a `ScoreMod` (no tensors, not additive)."""
    if fn is None or isinstance(fn, ScoreMod):
        return fn
    if not callable(fn):
        raise TypeError(f"score_mod must be callable or None, got {type(fn).__name__}")
    return ScoreMod(fn)


class ALiBi(ScoreMod):
    """ALiBi (Press et al., 2022): score − slope_h · |k − q − offset|, nothing learned.

    ``offset`` = k_len − q_len aligns the queries bottom-right, as `positional.ALiBi` does,
    so decoding after a cache sees the same distances as the whole sequence. On a tile
    wholly before (or after) the diagonal the bias is slope·(k − q − offset) (or its
    negative): a per-row plus a per-key part.
    """

    additive = True

    def __init__(self, slopes: Tensor, offset: int = 0) -> None:
        self.slopes = slopes
        self.offset = offset
        self.tensors = ()
        self.name = f"alibi({slopes.numel()} heads)"

    def _slope(self, h: Tensor) -> Tensor:
        return self.slopes.to(h.device)[h]

    def bias(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return -self._slope(h) * (k - q - self.offset).abs()

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return score + self.bias(h, q, k).to(score.dtype)

    def bias_parts(
        self, h: Tensor, q: Tensor, k: Tensor, bounds: tuple[int, int, int, int]
    ) -> tuple[Tensor, Tensor] | None:
        slope = self._slope(h)
        q_first, q_last, k_first, k_last = bounds[0], bounds[1] - 1, bounds[2], bounds[3] - 1
        if k_last <= q_first + self.offset:  # every key at or before every query
            return -slope * (q - q_first), slope * (k - q_first - self.offset)
        if k_first >= q_last + self.offset:  # every key at or after every query
            return slope * (q - q_first), -slope * (k - q_first - self.offset)
        return None


def alibi(num_heads: int, *, q_len: int | None = None, k_len: int | None = None) -> ALiBi:
    """ALiBi's score mod for ``num_heads`` heads (their slopes as in the paper); with both
    lengths given, queries are aligned bottom-right (decoding after a cache)."""
    offset = 0 if q_len is None or k_len is None else k_len - q_len
    return ALiBi(alibi_slopes(num_heads).float(), offset)


class RelativeBias(ScoreMod):
    """T5's learned relative position bias: score + table[bucket(k − q − offset), h].

    ``table`` (num_buckets, heads) is learned: the tiled kernel returns its gradient.
    """

    additive = True

    def __init__(
        self,
        table: Tensor,
        *,
        bidirectional: bool = True,
        max_distance: int = 128,
        offset: int = 0,
    ) -> None:
        self.table = table
        self.tensors = (table,)
        self.bidirectional = bidirectional
        self.max_distance = max_distance
        self.offset = offset
        self.name = f"relative_bias({table.shape[0]} buckets)"

    def bias(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        buckets = relative_position_bucket(
            k - q - self.offset,
            bidirectional=self.bidirectional,
            num_buckets=self.table.shape[0],
            max_distance=self.max_distance,
        )  # (1, 1, Q, K)
        return self.table[buckets.squeeze(1), :].permute(0, 3, 1, 2)[:, h.view(-1)]

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return score + self.bias(h, q, k).to(score.dtype)


def relative_bias(
    table: Tensor,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    q_len: int | None = None,
    k_len: int | None = None,
) -> RelativeBias:
    """T5's relative bias as a score mod, reading (and training) ``table`` (buckets, heads)."""
    if not isinstance(table, Tensor) or table.ndim != 2:
        raise ValueError("table must be a (num_buckets, heads) tensor")
    offset = 0 if q_len is None or k_len is None else k_len - q_len
    return RelativeBias(
        table, bidirectional=bidirectional, max_distance=max_distance, offset=offset
    )


class SoftCap(ScoreMod):
    """Logit soft-capping (Gemma 2): cap · tanh(score / cap), bounded scores."""

    def __init__(self, cap: float) -> None:
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not cap > 0:
            raise ValueError(f"softcap must be a positive number, got {cap!r}")
        if not math.isfinite(cap):
            raise ValueError(f"softcap must be finite, got {cap!r}")
        self.cap = float(cap)
        self.tensors = ()
        self.name = f"soft-capping at {self.cap:g}"

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)


def softcap(cap: float) -> SoftCap:
    """Soft-capping as a score mod: the same as ``attention(..., softcap=cap)``."""
    return SoftCap(cap)


class Chain(ScoreMod):
    """Several score mods applied in order; additive when all of them are."""

    def __init__(self, mods: Sequence[ScoreMod]) -> None:
        self.mods = tuple(mods)
        self.tensors = tuple(t for mod in self.mods for t in mod.tensors)
        self.additive = all(mod.additive for mod in self.mods)
        self.name = " then ".join(mod.name for mod in self.mods)

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        for mod in self.mods:
            score = mod(score, b, h, q, k)
        return score

    def bias(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        total = self.mods[0].bias(h, q, k)
        for mod in self.mods[1:]:
            total = total + mod.bias(h, q, k)
        return total

    def bias_parts(
        self, h: Tensor, q: Tensor, k: Tensor, bounds: tuple[int, int, int, int]
    ) -> tuple[Tensor, Tensor] | None:
        parts = [mod.bias_parts(h, q, k, bounds) for mod in self.mods]
        if any(part is None for part in parts):
            return None
        rows = sum(part[0] for part in parts if part is not None)
        keys = sum(part[1] for part in parts if part is not None)
        return rows, keys  # type: ignore[return-value]


def chain(*mods: ScoreModFn | ScoreMod | None) -> ScoreMod | None:
    """The given score mods (None skipped) as one, applied left to right."""
    present = [as_score_mod(mod) for mod in mods if mod is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return Chain([mod for mod in present if mod is not None])
