"""`AttentionConfig`: the options of the attention inside a layer, a stack or a model.

A model's config names each option once and the layers hand them to every
`MultiHeadAttention` they build. The sliding window is the one option that is a mask rather
than a layer argument: `window_mask` adds it, once per stack call, where it changes anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from . import masks as masks_lib
from .cache import KVCache, SlidingWindowKVCache
from .kernels.base import combine_masks
from .masks import Mask
from .multi_head_attention import MultiHeadAttention

Positions = Literal["rope", "alibi", "relative"] | None
CausalArg = bool | Literal["top-left", "bottom-right"]
SelfCache = KVCache | SlidingWindowKVCache

__all__ = [
    "AttentionConfig",
    "from_saved",
    "model_attention",
    "new_self_cache",
    "packed_check",
    "window_mask",
]

POSITIONS = (None, "rope", "alibi", "relative")


@dataclass(frozen=True)
class AttentionConfig:
    """The options of every `MultiHeadAttention` in a layer or a stack, as one value.

    ``num_kv_heads`` (GQA), ``qk_norm``, ``softcap``, ``positions``, ``rope_base``,
    ``num_buckets`` and ``max_distance`` mean what they mean on `MultiHeadAttention`;
    ``positions`` applies to self-attention only. ``bias`` None follows the layer's ``bias``
    (Llama: biases nowhere; Qwen: on the attention projections only). ``window``: each query
    sees only the last ``window`` keys, itself included (Mistral's causal sliding window), as
    `masks.sliding_window` over the self-attention.
    """

    num_kv_heads: int | None = None
    bias: bool | None = None
    qk_norm: bool = False
    softcap: float | None = None
    positions: Positions = None
    rope_base: float = 10000.0
    num_buckets: int = 32
    max_distance: int = 128
    window: int | None = None

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(
                f"positions must be None, 'rope', 'alibi' or 'relative', got {self.positions!r}"
            )
        w = self.window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise ValueError(f"window must be None or a positive int, got {w!r}")
        for name in ("bias", "qk_norm"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "bias" and value is None):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        cap = self.softcap
        if cap is not None and not (
            isinstance(cap, int | float) and not isinstance(cap, bool) and math.isfinite(cap)
        ):
            raise ValueError(f"softcap must be a positive finite number or None, got {cap!r}")

    def layer_kwargs(self, bias: bool, dropout: float, *, cross: bool = False) -> dict[str, Any]:
        """Keyword arguments of `MultiHeadAttention` (cross-attention has no positions)."""
        kwargs = asdict(self)
        del kwargs["window"]
        kwargs["bias"] = bias if self.bias is None else self.bias
        kwargs["dropout"] = dropout
        if cross:
            for name in ("positions", "rope_base", "num_buckets", "max_distance"):
                del kwargs[name]
        return kwargs


def from_saved(name: str, value: object) -> AttentionConfig | None:
    """A model config's ``attention`` field: None, an `AttentionConfig`, or the dict that
    `dataclasses.asdict` wrote into a saved config.json (unknown keys are refused)."""
    if value is None or isinstance(value, AttentionConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(
            f"{name} must be an AttentionConfig, a dict of its fields or None, "
            f"got {type(value).__name__}"
        )
    known = {f.name for f in fields(AttentionConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{name} has fields {unknown} that AttentionConfig does not know")
    return AttentionConfig(**value)


def model_attention(value: object, num_heads: int) -> AttentionConfig | None:
    """A model config's ``attention`` for a model with a bidirectional encoder (`from_saved`,
    then checked against ``num_heads``; the causal sliding window is refused)."""
    attention = from_saved("attention", value)
    if attention is None:
        return None
    if attention.window is not None:
        raise ValueError(
            f"attention.window={attention.window} is a causal sliding window, but the "
            "encoder attends both ways"
        )
    kv = attention.num_kv_heads
    if kv is not None and (
        isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or num_heads % kv
    ):
        raise ValueError(
            f"attention.num_kv_heads must be None or a positive divisor of num_heads "
            f"({num_heads}), got {kv!r}"
        )
    return attention


def resolve(
    attention: AttentionConfig | None, num_kv_heads: int | None, qk_norm: bool
) -> AttentionConfig:
    """The layer's config: ``attention``, or the older separate arguments (not both)."""
    if attention is None:
        return AttentionConfig(num_kv_heads=num_kv_heads, qk_norm=qk_norm)
    if not isinstance(attention, AttentionConfig):
        raise TypeError(f"attention must be an AttentionConfig, got {type(attention).__name__}")
    if num_kv_heads is not None or qk_norm:
        raise ValueError(
            "num_kv_heads and qk_norm go inside attention=AttentionConfig(...) when it is given"
        )
    return attention


def _and(mask: Mask | Tensor | None, band: Mask) -> Mask | Tensor:
    """``mask`` restricted to ``band`` (a boolean tensor stays a tensor, a float bias gets
    -inf outside the band)."""
    if mask is None:
        return band
    if isinstance(mask, Mask):
        return mask & band
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask must be a multihead Mask or a torch.Tensor, got {type(mask).__name__}"
        )
    if mask.ndim < 2 or tuple(mask.shape[-2:]) != (band.q_len, band.k_len):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the window needs (..., q_len, k_len) = "
            f"(..., {band.q_len}, {band.k_len})"
        )
    combined = combine_masks(band.to_dense(mask.device)[0, 0], mask)
    assert combined is not None
    return combined


def window_mask(
    window: int | None,
    mask: Mask | Tensor | None,
    causal: CausalArg,
    x: Tensor,
    cache: SelfCache | None,
) -> tuple[Mask | Tensor | None, CausalArg]:
    """The self-attention mask and causal flag once the sliding ``window`` is added.

    The band is causal itself, so it replaces ``causal``. Nothing is built where the window
    holds every key (plain causal keeps the fast path) or where a `SlidingWindowKVCache`
    applies the window itself.
    """
    if window is None:
        return mask, causal
    if causal is False:
        raise ValueError(f"window={window} is a causal sliding window: call with causal=True")
    if isinstance(cache, SlidingWindowKVCache):
        if cache.window != window:
            raise ValueError(
                f"the layer's window is {window} but its SlidingWindowKVCache keeps {cache.window}"
            )
        return mask, causal
    if not isinstance(x, Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (batch, seq, d_model) tensor, got {shape}")
    q_len = x.shape[1]
    k_len = q_len + (0 if cache is None else cache.length)
    if k_len <= window:
        return mask, causal
    align = "bottom-right" if cache is not None or causal == "bottom-right" else "top-left"
    band = masks_lib.sliding_window(q_len, k_len, window=window, align=align)
    return _and(mask, band), False


def new_self_cache(
    attn: MultiHeadAttention,
    window: int | None,
    batch_size: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> SelfCache:
    """A ring buffer of ``window`` positions for a windowed layer, else a full KVCache."""
    sizes = (batch_size, attn.num_kv_heads)
    if window is not None and window < max_len:
        return SlidingWindowKVCache(*sizes, window, attn.head_dim, dtype=dtype, device=device)
    return KVCache(*sizes, max_len, attn.head_dim, dtype=dtype, device=device)


def packed_check(
    window: int | None,
    x: object,
    mask: object,
    causal: CausalArg,
    cache: object,
    cu_seqlens: Tensor,
) -> None:
    """Refuse what cannot join a packed (``cu_seqlens``) self-attention, before any work.

    Each sequence attends only to itself, so a mask over the packed tokens has no meaning
    here and a cache has no batch rows to hold; a sliding window shorter than a sequence
    would need a mask per sequence, so it is refused (a window that holds every sequence
    whole changes nothing and is allowed).
    """
    if mask is not None:
        raise ValueError(
            "mask cannot be combined with cu_seqlens: each packed sequence already attends "
            "only to itself (use causal=True, or a padded batch with a mask)"
        )
    if cache is not None:
        raise ValueError("a cache cannot be combined with cu_seqlens: decode a padded batch")
    if causal not in (False, True, "top-left", "bottom-right"):
        raise ValueError(
            f"causal must be True, False, 'top-left' or 'bottom-right', got {causal!r}"
        )
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"with cu_seqlens, x must be packed as (total_tokens, d_model), got {shape}"
        )
    cu = masks_lib.check_cu_seqlens("cu_seqlens", cu_seqlens)
    if int(cu[-1]) != x.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but x packs {x.shape[0]} tokens")
    if window is None:
        return
    if causal is False:
        raise ValueError(f"window={window} is a causal sliding window: call with causal=True")
    longest = int(cu.diff().max()) if cu.numel() > 1 else 0
    if longest > window:
        raise ValueError(
            f"the layers' sliding window ({window}) is shorter than the longest packed "
            f"sequence ({longest} tokens), and cu_seqlens cannot express a window per "
            "sequence: pass a padded batch with a mask instead"
        )
