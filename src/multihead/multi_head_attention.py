"""`MultiHeadAttention`: project to heads, attend, concatenate, project back.

Input and output are (batch, seq, embed_dim). The heads split embed_dim into
num_heads × head_dim; with ``num_kv_heads`` < num_heads the keys and values have fewer heads
(grouped-query attention), each shared by a group of query heads. ``positions`` puts
order inside attention: RoPE rotates the projected queries and keys, ALiBi and T5's relative
bias are score mods (`multihead.score_mods`), computed by the kernel where it needs them.
Caches (`multihead.cache.AttentionCache`) own what decoding needs; `forward_packed` takes a
packed ragged batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import masks as masks_lib
from . import score_mods
from .cache import NO_CACHE, AttentionCache
from .functional import CausalArg, attention, check_mask
from .kernels.base import combine_masks
from .masks import Mask
from .positional import ALiBi, RelativePositionBias, RotaryEmbedding
from .score_mods import ScoreMod
from .varlen import attention_varlen

NeedWeights = Literal[False, "mean", "per_head"]
PositionsArg = Literal["rope", "alibi", "relative"] | None

__all__ = ["MultiHeadAttention", "weights_recorders"]

weights_recorders: list[Callable[[MultiHeadAttention, Tensor], None]] = []
"""While not empty (inside `multihead.viz.capture_attention`), every MultiHeadAttention hands
its per-head weights to the last of these callables. The output still comes from the kernel
that runs without a capture; the weights are computed beside it (the reference kernel,
without autograd). Empty (the default) it costs one truth test of a list: a plain Python
object, which torch.compile reads as a constant (a ContextVar it cannot trace)."""


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def refuse_beyond_self_attention(
    what: str,
    query: object,
    key: object,
    value: object,
    mask: object,
    need_weights: object,
    cache: object,
) -> None:
    """Packed or sharded self-attention reads only the query: name the first other argument
    given, rather than ignore it."""
    unsupported = {
        "key": key is not None and key is not query,
        "value": value is not None and value is not query,
        "mask": mask is not None,
        "need_weights": bool(need_weights),
        "cache": cache is not None,
    }
    for name, given in unsupported.items():
        if given:
            raise ValueError(f"{name} cannot be used with {what}")


def check_like_weights(name: str, x: Tensor, weight: Tensor, owner: str = "layer") -> None:
    """``x`` must be floating point with the dtype and device of the ``owner``'s ``weight``
    (no silent casts)."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the {owner}'s weights are {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the {owner} is on {weight.device}")


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al., 2017) with GQA, QK-norm and soft-capping.

    Args:
        embed_dim: model width d_model; must be divisible by ``num_heads``.
        num_heads: number of query heads; head_dim = embed_dim // num_heads.
        num_kv_heads: key/value heads (a divisor of num_heads); default num_heads.
        kdim, vdim: feature sizes of key and value inputs when they differ from embed_dim.
        bias: biases on the projections.
        dropout: dropout on the attention weights while training.
        qk_norm: RMSNorm on each head's queries and keys (stabilises large logits).
        softcap: logits become softcap·tanh(logits/softcap).
        positions: relative positions inside self-attention: "rope" (Su et al., 2021) rotates
            queries and keys after the projections, "alibi" (Press et al., 2022) and
            "relative" (T5, Raffel et al., 2020; bidirectional buckets) add a bias to the
            scores. Queries are aligned bottom-right on the keys, so a cached decoding step
            gets its true positions. Not for cross-attention.
        rope_base: RoPE's θ base. num_buckets, max_distance: T5's bucketing.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        qk_norm: bool = False,
        softcap: float | None = None,
        positions: PositionsArg = None,
        rope_base: float = 10000.0,
        num_buckets: int = 32,
        max_distance: int = 128,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}): "
                f"each head gets embed_dim / num_heads features"
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {softcap}")
        if positions not in (None, "rope", "alibi", "relative"):
            raise ValueError(
                f"positions must be None, 'rope', 'alibi' or 'relative', got {positions!r}"
            )
        self.kdim = embed_dim if kdim is None else _check_positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _check_positive_int("vdim", vdim)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.softcap = softcap
        kv_dim = num_kv_heads * self.head_dim
        factory = {"device": device, "dtype": dtype}

        # One fused projection when queries, keys and values share a width: self-attention
        # then costs a single matmul. Otherwise one projection each.
        self.fused = self.kdim == embed_dim and self.vdim == embed_dim
        if self.fused:
            self.in_proj = nn.Linear(embed_dim, embed_dim + 2 * kv_dim, bias=bias, **factory)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(self.kdim, kv_dim, bias=bias, **factory)
            self.v_proj = nn.Linear(self.vdim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.q_norm = nn.RMSNorm(self.head_dim, **factory) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, **factory) if qk_norm else None
        self.positions = positions
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if positions == "rope" else None
        self.alibi = ALiBi(num_heads) if positions == "alibi" else None
        self.relative_bias = (
            RelativePositionBias(num_heads, num_buckets, max_distance).to(**factory)
            if positions == "relative"
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As torch.nn.MultiheadAttention: xavier-uniform input projections, zero biases."""
        projections = [self.in_proj] if self.fused else [self.q_proj, self.k_proj, self.v_proj]
        for linear in projections:
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    # -- projections -------------------------------------------------------------------------
    @overload
    def _project(
        self, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    @overload
    def _project(
        self, query: Tensor, key: Tensor | None, value: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]: ...

    def _project(
        self, query: Tensor, key: Tensor | None, value: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Q, K, V = query W^Q, key W^K, value W^V; K and V are None without a key (a cache
        holds them)."""
        if self.fused and query is key and key is value:  # self-attention: one matmul
            e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
            return F.linear(query, self.in_proj.weight, self.in_proj.bias).split([e, kv, kv], -1)
        if key is None or value is None:
            return self._project_query(query), None, None
        return (self._project_query(query), *self._project_key_value(key, value))

    @overload
    def _heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...

    @overload
    def _heads(
        self, q: Tensor, k: Tensor | None, v: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]: ...

    def _heads(
        self, q: Tensor, k: Tensor | None, v: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Split the projections into heads; QK-norm normalises each head's queries and keys."""
        q = self.split_heads(q, self.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if k is None or v is None:
            return q, None, None
        k = self.split_heads(k, self.num_kv_heads)
        v = self.split_heads(v, self.num_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k, v

    def _project_query(self, query: Tensor) -> Tensor:
        if not self.fused:
            return self.q_proj(query)
        e, bias = self.embed_dim, self.in_proj.bias
        return F.linear(query, self.in_proj.weight[:e], None if bias is None else bias[:e])

    def _project_key_value(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if not self.fused:
            return self.k_proj(key), self.v_proj(value)
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        weight, bias = self.in_proj.weight[e:], self.in_proj.bias
        bias = None if bias is None else bias[e:]
        if key is value:
            k, v = F.linear(key, weight, bias).split([kv, kv], dim=-1)
            return k, v
        k_bias, v_bias = (None, None) if bias is None else (bias[:kv], bias[kv:])
        return F.linear(key, weight[:kv], k_bias), F.linear(value, weight[kv:], v_bias)

    @overload
    def _rotate(
        self, q: Tensor, k: Tensor, offset: int = ..., positions: Tensor | None = ...
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def _rotate(
        self, q: Tensor, k: Tensor | None, offset: int = ..., positions: Tensor | None = ...
    ) -> tuple[Tensor, Tensor | None]: ...

    def _rotate(
        self, q: Tensor, k: Tensor | None, offset: int = 0, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """RoPE on the heads' queries and keys (a no-op without ``positions="rope"``)."""
        if self.rotary is None or k is None:
            return q, k
        return self.rotary(q, offset, positions), self.rotary(k, offset, positions)

    def project_heads(
        self, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's first steps, for callers that attend their own way (ring attention):
        inputs checked, projected and split into heads (QK-norm applied), not yet rotated
        (see `rotate`). q (B, H, Lq, D); k, v (B, Hkv, Lk, D)."""
        self._check_inputs(query, key, value)
        return self._heads(*self._project(query, key, value))

    def rotate(
        self, q: Tensor, k: Tensor, offset: int = 0, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """RoPE on heads from `project_heads`, at ``positions`` (default offset, offset+1, ...);
        a no-op without ``positions="rope"``."""
        return self._rotate(q, k, offset, positions)

    @property
    def has_position_bias(self) -> bool:
        """Whether the scores get a position-dependent bias (ALiBi, T5), which reads the keys
        by their place."""
        return self.alibi is not None or self.relative_bias is not None

    def position_score_mod(self, q_len: int, k_len: int, dtype: torch.dtype) -> ScoreMod | None:
        """ALiBi's or T5's bias as a score mod, queries aligned bottom-right on the keys (a
        decoding step gets its true distances), or None. No (q_len, k_len) tensor is built
        here: the kernel computes the bias where it needs it."""
        if self.alibi is not None:  # the layer's slopes, in float64 for a float64 call
            slopes = self.alibi.slopes
            slopes = slopes.double() if dtype == torch.float64 else slopes
            return score_mods.ALiBi(slopes, offset=k_len - q_len)
        if self.relative_bias is not None:  # reads (and trains) the layer's table
            return score_mods.relative_bias(
                self.relative_bias.embedding.weight,
                bidirectional=self.relative_bias.bidirectional,
                max_distance=self.relative_bias.max_distance,
                q_len=q_len,
                k_len=k_len,
            )
        return None

    def split_heads(self, x: Tensor, num_heads: int) -> Tensor:
        """(batch, seq, heads·head_dim) → (batch, heads, seq, head_dim)."""
        return x.unflatten(-1, (num_heads, self.head_dim)).transpose(1, 2)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        """(batch, heads, seq, head_dim) → (batch, seq, heads·head_dim): concatenate heads."""
        return x.transpose(1, 2).flatten(2)

    def _check_like_weights(self, name: str, x: Tensor) -> None:
        check_like_weights(name, x, self.out_proj.weight)

    def _check_inputs(self, query: object, key: object, value: object) -> None:
        """query, key and value (batch, seq, features), alike; key and value None are skipped
        (a cache holds them)."""
        for name, x, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if x is None and name != "query":
                continue
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.ndim != 3:
                raise ValueError(
                    f"{name} must be 3-D (batch, seq, features), got shape {tuple(x.shape)}"
                )
            if x.shape[-1] != width:
                raise ValueError(f"{name} has {x.shape[-1]} features but the layer expects {width}")
            self._check_like_weights(name, x)
        if key is None or value is None:
            return
        assert isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
        if not (query.shape[0] == key.shape[0] == value.shape[0]):
            raise ValueError(
                f"batch sizes differ: query {query.shape[0]}, key {key.shape[0]}, "
                f"value {value.shape[0]}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key has {key.shape[1]} positions but value has {value.shape[1]}; they must match"
            )

    # -- forward ------------------------------------------------------------------------------
    @overload
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = ...,
        value: Tensor | None = ...,
        *,
        mask: Mask | Tensor | None = ...,
        causal: CausalArg = ...,
        need_weights: Literal[False] = ...,
        cache: AttentionCache | None = ...,
        cu_seqlens: Tensor | None = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = ...,
        value: Tensor | None = ...,
        *,
        mask: Mask | Tensor | None = ...,
        causal: CausalArg = ...,
        need_weights: Literal["mean", "per_head"],
        cache: AttentionCache | None = ...,
        cu_seqlens: Tensor | None = ...,
    ) -> tuple[Tensor, Tensor]: ...

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Mask | Tensor | None = None,
        causal: CausalArg = False,
        need_weights: NeedWeights = False,
        cache: AttentionCache | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to ``key``/``value`` (default: to itself).

        Args:
            query: (batch, q_len, embed_dim).
            key, value: (batch, k_len, kdim / vdim); ``value`` defaults to ``key`` and
                ``key`` to ``query`` (self-attention).
            mask: `Mask` or tensor broadcastable to (batch, heads, q_len, k_len),
                True = may attend, float = additive bias.
            causal: True / "top-left" or "bottom-right" (see `multihead.attention`).
            need_weights: False, "mean" (batch, q_len, k_len) or "per_head"
                (batch, heads, q_len, k_len).
            cache: for decoding, an `AttentionCache`. A `KVCache` (self-attention): only
                ``query``'s new tokens are projected, their keys/values appended to the cache,
                and the queries attend to every cached key; ``causal=True`` then means
                "bottom-right" and ``mask`` must cover (q_len, cached length). A
                `CrossAttentionCache`: ``key``/``value`` are projected on the first call and
                reused afterwards (pass the memory or None). A `SlidingWindowKVCache`: as a
                KVCache, but the queries see only the last ``window`` positions (the cache
                adds the bottom-right sliding-window mask).
            cu_seqlens: a packed ragged batch: the same as ``forward_packed(query,
                cu_seqlens, causal=causal)`` (no key, value, mask, weights or cache).

        Returns the output (batch, q_len, embed_dim), and the weights if asked for.
        """
        weighted = _check_need_weights(need_weights)
        if cu_seqlens is not None:  # a packed ragged batch: see forward_packed
            return self._packed(query, key, value, cu_seqlens, mask, causal, need_weights, cache)
        cache = NO_CACHE if cache is None else cache
        # what keys and values are projected from (None: the cache holds them)
        key, value, causal = self._sources(query, key, value, causal, cache)
        # project, split heads: q (B, H, Lq, D); k, v (B, Hkv, L_new, D) or None
        q, k, v = self._heads(*self._project(query, key, value))
        # positions: RoPE at the tokens' absolute positions, after any cached ones
        q, k = self._rotate(q, k, cache.offset)
        # what the queries attend to: k, v (B, Hkv, Lk, D), in the order the cache picks
        k, v = cache.update(k, v, mask=mask, position_bias=self.has_position_bias, weights=weighted)
        mask = _both(check_mask(mask, q, k), cache.mask(q.shape[2], k.shape[2]))
        # ALiBi / T5's bias: a score mod, (Lq, Lk) aligned bottom-right; never a dense tensor
        score_mod = self.position_score_mod(q.shape[2], k.shape[2], q.dtype)
        # attention: heads (B, H, Lq, D); weights (B, H, Lq, Lk) if asked for
        heads, weights = self._attend(q, k, v, mask, causal, score_mod, weighted)
        # merge heads and project back: (B, Lq, E)
        output = self.out_proj(self.merge_heads(heads))
        if weights is None:
            return output
        return output, weights.mean(dim=1) if need_weights == "mean" else weights

    def _sources(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        causal: CausalArg,
        cache: AttentionCache,
    ) -> tuple[Tensor | None, Tensor | None, CausalArg]:
        """The cache's answer to what keys and values come from, checked; positions only for
        self-attention."""
        if cache is not NO_CACHE and not isinstance(cache, AttentionCache):
            raise TypeError(
                "cache must be an AttentionCache (KVCache, SlidingWindowKVCache, "
                f"CrossAttentionCache, or one of your own) or None, got {type(cache).__name__}"
            )
        key, value, causal = cache.prepare(query, key, value, causal)
        self._check_inputs(query, key, value)
        if self.positions is not None and key is not query:
            raise ValueError(
                f"positions={self.positions!r} is for self-attention; this call is "
                "cross-attention (key is not query)"
            )
        return key, value, causal

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Mask | Tensor | None,
        causal: CausalArg,
        score_mod: ScoreMod | None,
        need_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """`attention` over the heads, with the weights when asked for. Under a capture
        (`weights_recorders` not empty) the weights are computed beside the output, by the reference
        kernel without autograd, so the output is the one computed without a capture."""
        options = {"mask": mask, "causal": causal, "softcap": self.softcap, "score_mod": score_mod}
        dropout = self.dropout if self.training else 0.0
        result = attention(q, k, v, dropout_p=dropout, return_weights=need_weights, **options)
        heads, weights = result if isinstance(result, tuple) else (result, None)
        recorder = weights_recorders[-1] if weights_recorders else None
        if recorder is not None and weights is not None:
            recorder(self, weights)
        elif recorder is not None:
            with torch.no_grad():
                _, seen = attention(q, k, v, return_weights=True, kernel="reference", **options)
            recorder(self, seen)
        return heads, weights

    def _packed(
        self,
        query: Tensor,
        key: object,
        value: object,
        cu_seqlens: Tensor,
        mask: object,
        causal: CausalArg,
        need_weights: NeedWeights,
        cache: object,
    ) -> Tensor:
        """``forward(..., cu_seqlens=...)``: `forward_packed`, refusing what it cannot read."""
        self._check_packed(query)
        refuse_beyond_self_attention(
            "cu_seqlens (packed self-attention)", query, key, value, mask, need_weights, cache
        )
        return self.forward_packed(query, cu_seqlens, causal=causal)

    def _check_packed(self, query: object) -> None:
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
        if query.ndim != 2 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"with cu_seqlens, query must be packed (total_tokens, {self.embed_dim}), "
                f"got shape {tuple(query.shape)}"
            )

    def forward_packed(self, x: Tensor, cu_seqlens: Tensor, *, causal: CausalArg = False) -> Tensor:
        """Self-attention over a packed ragged batch.

        Args:
            x: (total_tokens, embed_dim), the sequences end to end.
            cu_seqlens: (batch + 1,) their cumulative lengths (see
                `multihead.attention_varlen`). Each sequence attends only to itself (RoPE
                positions restart at 0).
            causal: causal within each sequence.

        Returns (total_tokens, embed_dim). ALiBi and T5's bias read only the distance between
        two tokens of a sequence, so they apply as score mods; no weights: packed calls are
        not recorded by a capture.
        """
        self._check_packed(x)
        if causal not in (False, True, "top-left", "bottom-right"):
            raise ValueError(
                f"causal must be True, False, 'top-left' or 'bottom-right', got {causal!r}"
            )
        cu = masks_lib.check_cu_seqlens("cu_seqlens", cu_seqlens).to(x.device)
        if int(cu[-1]) != x.shape[0]:
            raise ValueError(
                f"cu_seqlens ends at {int(cu[-1])} but query packs {x.shape[0]} tokens"
            )
        self._check_like_weights("query", x)
        packed = x.unsqueeze(0)  # one long sequence: (1, total, embed_dim)
        q, k, v = self._heads(*self._project(packed, packed, packed))  # (1, heads, total, d)
        if self.rotary is not None:  # positions restart at 0 in every sequence
            starts = torch.repeat_interleave(cu[:-1], cu.diff())
            positions = torch.arange(len(starts), device=cu.device) - starts
            q, k = self._rotate(q, k, positions=positions)
        out = attention_varlen(
            *(t[0].transpose(0, 1) for t in (q, k, v)),  # packed (total, heads, head_dim)
            cu,
            cu,
            causal=bool(causal),
            softcap=self.softcap,
            score_mod=self.position_score_mod(x.shape[0], x.shape[0], x.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.flatten(1))

    def extra_repr(self) -> str:
        extra = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            extra += f", num_kv_heads={self.num_kv_heads}"
        if self.softcap is not None:
            extra += f", softcap={self.softcap}"
        if self.positions is not None:
            extra += f", positions={self.positions!r}"
        return extra


def _check_need_weights(need_weights: object) -> bool:
    """Whether the caller asked for weights; refuses what is not False, "mean", "per_head"."""
    if need_weights not in (False, "mean", "per_head"):
        raise ValueError(f"need_weights must be False, 'mean' or 'per_head', got {need_weights!r}")
    return bool(need_weights)


def _both(mask: Mask | Tensor | None, extra: Mask | None) -> Mask | Tensor | None:
    """The caller's (checked) mask and a cache's: `Mask` algebra when both are masks, else
    `combine_masks` (a tensor mask stays a tensor)."""
    if extra is None or mask is None:
        return mask if extra is None else extra
    if isinstance(mask, Mask):
        return mask & extra
    return combine_masks(extra.to_dense(mask.device), mask)
