"""`MultiHeadAttention`: project to heads, attend, concatenate, project back.

Input and output are (batch, seq, embed_dim). The heads split embed_dim into
num_heads × head_dim; with ``num_kv_heads`` < num_heads the keys and values have fewer heads
(grouped-query attention), each shared by a group of query heads.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import CrossAttentionCache, KVCache
from .functional import CausalArg, attention
from .masks import Mask

NeedWeights = Literal[False, "mean", "per_head"]

__all__ = ["MultiHeadAttention", "weights_recorder"]

# While set (by `multihead.viz.capture_attention`), every MultiHeadAttention computes its
# per-head weights and hands them to this callable. Unset (the default) it costs one lookup:
# the layer asks for weights only when its caller does, so the fast kernels still run.
weights_recorder: ContextVar[Callable[[MultiHeadAttention, Tensor], None] | None] = ContextVar(
    "multihead_weights_recorder", default=None
)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


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
    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused and query is key and key is value:  # self-attention: one matmul
            e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
            return F.linear(query, self.in_proj.weight, self.in_proj.bias).split([e, kv, kv], -1)
        return (self._project_query(query), *self._project_key_value(key, value))

    def _heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split the projections into heads; QK-norm normalises each head's queries and keys."""
        q = self.split_heads(q, self.num_heads)
        k = self.split_heads(k, self.num_kv_heads)
        v = self.split_heads(v, self.num_kv_heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
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

    def _cached_qkv(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        cache: KVCache | CrossAttentionCache,
        causal: CausalArg,
    ) -> tuple[Tensor, Tensor, Tensor, CausalArg]:
        """Heads for a decoding step: project only what the cache does not hold yet."""
        if isinstance(cache, KVCache):
            if any(x is not None and x is not query for x in (key, value)):
                raise ValueError("a KVCache is for self-attention: pass key=None and value=None")
            if causal == "top-left":
                raise ValueError(
                    "causal='top-left' is wrong with a KVCache (the new queries come after the "
                    "cached keys); pass causal=True or 'bottom-right'"
                )
            self._check_inputs(query, query, query)
            q, k, v = self._heads(*self._project(query, query, query))
            k, v = cache.append(k, v)
            return q, k, v, "bottom-right" if causal else False
        if not isinstance(cache, CrossAttentionCache):
            raise TypeError(
                "cache must be a KVCache, a CrossAttentionCache or None, "
                f"got {type(cache).__name__}"
            )
        if cache.is_empty:
            if key is None:
                raise ValueError("an empty CrossAttentionCache needs key (the memory) to fill it")
            value = key if value is None else value
            self._check_inputs(query, key, value)
            k, v = self._project_key_value(key, value)
            k = self.split_heads(k, self.num_kv_heads)
            v = self.split_heads(v, self.num_kv_heads)
            if self.k_norm is not None:
                k = self.k_norm(k)
            cache.store(k, v)
        assert cache.keys is not None and cache.values is not None
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
        if query.ndim != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query must be (batch, seq, {self.embed_dim}), got shape {tuple(query.shape)}"
            )
        if cache.keys.shape[0] != query.shape[0]:
            raise ValueError(
                f"query has batch size {query.shape[0]} but the CrossAttentionCache holds "
                f"{cache.keys.shape[0]}"
            )
        q = self.split_heads(self._project_query(query), self.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q, cache.keys, cache.values, causal

    def split_heads(self, x: Tensor, num_heads: int) -> Tensor:
        """(batch, seq, heads·head_dim) → (batch, heads, seq, head_dim)."""
        return x.unflatten(-1, (num_heads, self.head_dim)).transpose(1, 2)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        """(batch, heads, seq, head_dim) → (batch, seq, heads·head_dim): concatenate heads."""
        return x.transpose(1, 2).flatten(2)

    def _check_inputs(self, query: object, key: object, value: object) -> None:
        for name, x, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.ndim != 3:
                raise ValueError(
                    f"{name} must be 3-D (batch, seq, features), got shape {tuple(x.shape)}"
                )
            if x.shape[-1] != width:
                raise ValueError(f"{name} has {x.shape[-1]} features but the layer expects {width}")
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
        cache: KVCache | CrossAttentionCache | None = ...,
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
        cache: KVCache | CrossAttentionCache | None = ...,
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
        cache: KVCache | CrossAttentionCache | None = None,
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
            cache: for decoding. A `KVCache` (self-attention): only ``query``'s new tokens
                are projected, their keys/values appended to the cache, and the queries attend
                to every cached key; ``causal=True`` then means "bottom-right" and ``mask``
                must cover (q_len, cached length). A `CrossAttentionCache`: ``key``/``value``
                are projected on the first call and reused afterwards (pass the memory or None).

        Returns the output (batch, q_len, embed_dim), and the weights if asked for.
        """
        if need_weights not in (False, "mean", "per_head"):
            raise ValueError(
                f"need_weights must be False, 'mean' or 'per_head', got {need_weights!r}"
            )
        if cache is not None:
            q, k, v, causal = self._cached_qkv(query, key, value, cache, causal)
        else:
            key = query if key is None else key
            value = key if value is None else value
            self._check_inputs(query, key, value)
            q, k, v = self._heads(*self._project(query, key, value))

        recorder = weights_recorder.get()
        result = attention(
            q,
            k,
            v,
            mask=mask,
            causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            softcap=self.softcap,
            return_weights=bool(need_weights) or recorder is not None,
        )
        if isinstance(result, Tensor):
            return self.out_proj(self.merge_heads(result))
        heads, weights = result
        if recorder is not None:
            recorder(self, weights)
        output = self.out_proj(self.merge_heads(heads))
        if not need_weights:
            return output
        return output, weights.mean(dim=1) if need_weights == "mean" else weights

    def extra_repr(self) -> str:
        extra = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            extra += f", num_kv_heads={self.num_kv_heads}"
        if self.softcap is not None:
            extra += f", softcap={self.softcap}"
        return extra
