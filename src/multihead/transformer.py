"""The Transformer's layers (Vaswani et al., 2017, §3.1), in the paper's order.

Each sublayer (self-attention, cross-attention, feed-forward) sits in a residual connection
with dropout and a norm. ``norm_first=False`` is the paper's post-norm,
``x = norm(x + sublayer(x))``; ``norm_first=True`` (default) is pre-norm,
``x = x + sublayer(norm(x))``, which trains deep stacks without warm-up tricks and needs a
final norm after the stack. Inputs are (batch, seq, d_model); masks are True = may attend.
With ``cu_seqlens=`` the encoder and decoder-only layers and stacks take a packed ragged
batch instead, (total_tokens, d_model), each sequence attending only to itself.

One `AttentionConfig` (``attention=``) reaches every `MultiHeadAttention` of a layer or a
stack: positions (RoPE, ALiBi, T5's bias), soft-capping, QK-norm, GQA, projection bias and a
causal sliding window. A decoder-only model (GPT, Llama) is a `DecoderOnly` stack of
`DecoderOnlyLayer`s: causal self-attention and feed-forward, no cross-attention.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention_config import (
    AttentionConfig,
    CausalArg,
    SelfCache,
    new_self_cache,
    packed_check,
    resolve,
    window_mask,
)
from .cache import CrossAttentionCache
from .masks import Mask
from .multi_head_attention import MultiHeadAttention

Activation = Literal["relu", "gelu", "swiglu", "geglu"]
NormKind = Literal["layernorm", "rmsnorm"]

__all__ = [
    "AttentionConfig",
    "Decoder",
    "DecoderLayer",
    "DecoderOnly",
    "DecoderOnlyLayer",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
]

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")


def make_norm(kind: str, d_model: int, eps: float, bias: bool = True) -> nn.Module:
    """LayerNorm (the paper's) or RMSNorm (no centring, no bias: cheaper, as in LLaMA)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class FeedForward(nn.Module):
    """Position-wise feed-forward network: FFN(x) = act(x W1 + b1) W2 + b2 (§3.3).

    "swiglu" and "geglu" are the gated variants (Shazeer, 2020): FFN(x) = (act(x W) ⊗ x V) W2
    with act = Swish (SiLU) or GELU, as in LLaMA and PaLM. ``linear1`` holds [W; V] stacked,
    so both take one matmul; ``dim_feedforward`` is the width of the product.
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: Activation = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        gated = activation in ("swiglu", "geglu")
        self.linear1 = nn.Linear(d_model, (2 if gated else 1) * dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.linear1(x)
        if self.activation == "relu":
            hidden = F.relu(hidden)
        elif self.activation == "gelu":
            hidden = F.gelu(hidden)
        else:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = (F.silu(gate) if self.activation == "swiglu" else F.gelu(gate)) * up
        return self.linear2(self.dropout(hidden))


def _torch_activation(layer: nn.Module) -> Activation:
    """The name of a torch Transformer layer's activation; only relu and gelu translate."""
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"layer.activation must be relu or gelu to convert, got {act!r}")


def _from_torch(cls, layer: nn.Module, norms: tuple[str, ...]):
    """A ``cls`` layer with a torch layer's sizes, its feed-forward and its norms copied
    (the attention is copied by the caller: encoder and decoder layers differ there)."""
    ours = cls(
        layer.linear1.in_features,
        layer.self_attn.num_heads,
        layer.linear1.out_features,
        layer.dropout.p,
        activation=_torch_activation(layer),
        norm_first=layer.norm_first,
        layer_norm_eps=layer.norm1.eps,
        bias=layer.linear1.bias is not None,
    )
    ours.feed_forward.linear1.load_state_dict(layer.linear1.state_dict())
    ours.feed_forward.linear2.load_state_dict(layer.linear2.state_dict())
    for name in norms:
        getattr(ours, name).load_state_dict(getattr(layer, name).state_dict())
    return ours


def _copy_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    if not theirs._qkv_same_embed_dim:
        raise ValueError("only torch attention with kdim == vdim == embed_dim can be converted")
    ours.in_proj.weight.data.copy_(theirs.in_proj_weight.data)
    ours.out_proj.weight.data.copy_(theirs.out_proj.weight.data)
    if theirs.in_proj_bias is not None:
        ours.in_proj.bias.data.copy_(theirs.in_proj_bias.data)
        ours.out_proj.bias.data.copy_(theirs.out_proj.bias.data)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a residual connection with a norm.

    With ``causal=True`` in forward it is also a decoder-only block (see `DecoderOnlyLayer`).
    ``attention`` sets the self-attention's options; ``num_kv_heads`` and ``qk_norm`` are
    the older spelling of two of them.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        norm: NormKind = "layernorm",
        norm_first: bool = True,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        *,
        attention: AttentionConfig | None = None,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attention_config = config = resolve(attention, num_kv_heads, qk_norm)
        self.window = config.window
        self.self_attn = MultiHeadAttention(
            d_model, num_heads, **config.layer_kwargs(bias, dropout)
        )
        self.feed_forward = FeedForward(d_model, dim_feedforward, dropout, activation, bias)
        self.norm1 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.norm2 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def self_attention_mask(
        self, x: Tensor, mask: Mask | Tensor | None, causal: CausalArg, cache: SelfCache | None
    ) -> tuple[Mask | Tensor | None, CausalArg]:
        """``mask`` and ``causal`` with this layer's sliding window added (`window_mask`)."""
        return window_mask(self.window, mask, causal, x, cache)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> SelfCache:
        """An empty cache for decoding up to ``max_len`` positions (a ring buffer of
        ``window`` positions when the layer has a shorter window)."""
        return new_self_cache(self.self_attn, self.window, batch_size, max_len, dtype, device)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        causal: CausalArg = False,
        cache: SelfCache | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """x (batch, seq, d_model) → same shape. ``cache`` decodes causally step by step.

        With ``cu_seqlens`` (batch + 1,) x is a packed ragged batch (total_tokens, d_model):
        each sequence attends only to itself (`MultiHeadAttention.forward_packed`); no mask
        or cache joins it.
        """
        if cu_seqlens is not None:
            packed_check(self.window, x, mask, causal, cache, cu_seqlens)
            return self.block(x, mask=None, causal=causal, cache=None, cu_seqlens=cu_seqlens)
        mask, causal = self.self_attention_mask(x, mask, causal, cache)
        return self.block(x, mask=mask, causal=causal, cache=cache)

    def block(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None,
        causal: CausalArg,
        cache: SelfCache | None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """The layer once its mask holds the window: a stack builds that mask once for all."""

        def self_attention(h: Tensor) -> Tensor:
            if cu_seqlens is not None:  # packed: (total_tokens, d_model)
                return self.dropout1(self.self_attn.forward_packed(h, cu_seqlens, causal=causal))
            return self.dropout1(self.self_attn(h, mask=mask, causal=causal, cache=cache))

        def feed_forward(h: Tensor) -> Tensor:
            return self.dropout2(self.feed_forward(h))

        if self.norm_first:
            x = x + self_attention(self.norm1(x))
            return x + feed_forward(self.norm2(x))
        x = self.norm1(x + self_attention(x))
        return self.norm2(x + feed_forward(x))

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> EncoderLayer:
        """Our layer with the weights of a (batch_first) torch ``nn.TransformerEncoderLayer``."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(
                f"layer must be an nn.TransformerEncoderLayer, got {type(layer).__name__}"
            )
        ours = _from_torch(cls, layer, ("norm1", "norm2"))
        _copy_attention(ours.self_attn, layer.self_attn)
        return ours.to(layer.linear1.weight.device, layer.linear1.weight.dtype)


class DecoderOnlyLayer(EncoderLayer):
    """A decoder-only (GPT, Llama) block: causal self-attention then feed-forward.

    An `EncoderLayer` whose forward is causal unless told otherwise; it has no
    cross-attention, unlike `DecoderLayer` (the encoder-decoder's).
    """

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        causal: CausalArg = True,
        cache: SelfCache | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """x (batch, seq, d_model) → same shape; ``mask`` (e.g. documents) joins causal.

        ``cu_seqlens``: x is packed (total_tokens, d_model), as in `EncoderLayer.forward`.
        """
        return super().forward(x, mask=mask, causal=causal, cache=cache, cu_seqlens=cu_seqlens)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder memory, then feed-forward.

    ``attention`` reaches both attentions; its positions and window only the self-attention.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        norm: NormKind = "layernorm",
        norm_first: bool = True,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        *,
        attention: AttentionConfig | None = None,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attention_config = config = resolve(attention, num_kv_heads, qk_norm)
        self.window = config.window
        self_kwargs = config.layer_kwargs(bias, dropout)
        self.self_attn = MultiHeadAttention(d_model, num_heads, **self_kwargs)
        cross_kwargs = config.layer_kwargs(bias, dropout, cross=True)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, **cross_kwargs)
        self.feed_forward = FeedForward(d_model, dim_feedforward, dropout, activation, bias)
        self.norm1 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.norm2 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.norm3 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def self_attention_mask(
        self, x: Tensor, mask: Mask | Tensor | None, causal: CausalArg, cache: SelfCache | None
    ) -> tuple[Mask | Tensor | None, CausalArg]:
        """``tgt_mask`` and ``causal`` with the sliding window added (`window_mask`)."""
        return window_mask(self.window, mask, causal, x, cache)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> SelfCache:
        """An empty self-attention cache (see `EncoderLayer.new_cache`)."""
        return new_self_cache(self.self_attn, self.window, batch_size, max_len, dtype, device)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        tgt_mask: Mask | Tensor | None = None,
        memory_mask: Mask | Tensor | None = None,
        causal: CausalArg = True,
        self_cache: SelfCache | None = None,
        cross_cache: CrossAttentionCache | None = None,
    ) -> Tensor:
        """x (batch, tgt_len, d_model), memory (batch, src_len, d_model) → like x.

        ``memory`` may be None once ``cross_cache`` holds its keys and values.
        """
        tgt_mask, causal = self.self_attention_mask(x, tgt_mask, causal, self_cache)
        return self.block(
            x,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            causal=causal,
            self_cache=self_cache,
            cross_cache=cross_cache,
        )

    def block(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        tgt_mask: Mask | Tensor | None,
        memory_mask: Mask | Tensor | None,
        causal: CausalArg,
        self_cache: SelfCache | None,
        cross_cache: CrossAttentionCache | None,
    ) -> Tensor:
        """The layer once ``tgt_mask`` holds the window (a stack builds it once for all)."""
        if memory is None and (cross_cache is None or cross_cache.is_empty):
            raise ValueError("memory is None, so cross_cache must hold the memory's keys/values")

        def self_attention(h: Tensor) -> Tensor:
            out = self.self_attn(h, mask=tgt_mask, causal=causal, cache=self_cache)
            return self.dropout1(out)

        def cross_attention(h: Tensor) -> Tensor:
            return self.dropout2(self.cross_attn(h, memory, mask=memory_mask, cache=cross_cache))

        def feed_forward(h: Tensor) -> Tensor:
            return self.dropout3(self.feed_forward(h))

        if self.norm_first:
            x = x + self_attention(self.norm1(x))
            x = x + cross_attention(self.norm2(x))
            return x + feed_forward(self.norm3(x))
        x = self.norm1(x + self_attention(x))
        x = self.norm2(x + cross_attention(x))
        return self.norm3(x + feed_forward(x))

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer) -> DecoderLayer:
        """Our layer with the weights of a (batch_first) torch ``nn.TransformerDecoderLayer``."""
        if not isinstance(layer, nn.TransformerDecoderLayer):
            raise TypeError(
                f"layer must be an nn.TransformerDecoderLayer, got {type(layer).__name__}"
            )
        ours = _from_torch(cls, layer, ("norm1", "norm2", "norm3"))
        _copy_attention(ours.self_attn, layer.self_attn)
        _copy_attention(ours.cross_attn, layer.multihead_attn)
        return ours.to(layer.linear1.weight.device, layer.linear1.weight.dtype)


class _Stack(nn.Module):
    """``num_layers`` layers of ``layer_class`` (plus a final norm when pre-norm)."""

    layer_class: type[EncoderLayer] | type[DecoderLayer]
    layers: nn.ModuleList

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        norm: NormKind = "layernorm",
        norm_first: bool = True,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        *,
        attention: AttentionConfig | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.layers = nn.ModuleList(
            self.layer_class(
                d_model,
                num_heads,
                dim_feedforward,
                dropout,
                activation,
                norm,
                norm_first,
                layer_norm_eps,
                bias,
                num_kv_heads,
                qk_norm,
                attention=attention,
            )
            for _ in range(num_layers)
        )
        self.norm = make_norm(norm, d_model, layer_norm_eps, bias) if norm_first else None

    def new_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> list[SelfCache]:
        """One empty self-attention cache per layer, for decoding up to ``max_len`` positions."""
        return [
            layer.new_cache(batch_size, max_len, dtype=dtype, device=device)
            for layer in self.layers
        ]

    def _check_caches(self, name: str, caches: list[Any] | None) -> None:
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(
                f"{name} has {len(caches)} entries but there are {len(self.layers)} layers"
            )


class Encoder(_Stack):
    """A stack of ``num_layers`` EncoderLayers (plus a final norm when pre-norm)."""

    layer_class: type[EncoderLayer] = EncoderLayer

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        causal: CausalArg = False,
        caches: list[SelfCache] | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Run every layer; ``caches`` holds one cache per layer when decoding.

        The sliding-window mask is built once here and shared by every layer. With
        ``cu_seqlens`` (batch + 1,) x is a packed ragged batch (total_tokens, d_model) and
        each sequence attends only to itself, as if run alone (no mask, no caches).
        """
        if cu_seqlens is not None:
            packed_check(self.layers[0].window, x, mask, causal, caches, cu_seqlens)
            for layer in self.layers:
                x = layer.block(x, mask=None, causal=causal, cache=None, cu_seqlens=cu_seqlens)
            return x if self.norm is None else self.norm(x)
        self._check_caches("caches", caches)
        first = self.layers[0]
        mask, causal = first.self_attention_mask(
            x, mask, causal, None if caches is None else caches[0]
        )
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            x = layer.block(x, mask=mask, causal=causal, cache=cache)
        return x if self.norm is None else self.norm(x)


class DecoderOnly(Encoder):
    """A decoder-only stack (GPT, Llama): `DecoderOnlyLayer`s, causal unless told otherwise."""

    layer_class = DecoderOnlyLayer

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        causal: CausalArg = True,
        caches: list[SelfCache] | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Run every layer; ``mask`` (e.g. `masks.documents`) joins the causal mask.

        ``cu_seqlens``: x is packed (total_tokens, d_model), as in `Encoder.forward`.
        """
        return super().forward(x, mask=mask, causal=causal, caches=caches, cu_seqlens=cu_seqlens)


class Decoder(_Stack):
    """A stack of ``num_layers`` DecoderLayers (plus a final norm when pre-norm)."""

    layer_class = DecoderLayer

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        tgt_mask: Mask | Tensor | None = None,
        memory_mask: Mask | Tensor | None = None,
        self_caches: list[SelfCache] | None = None,
        cross_caches: list[CrossAttentionCache] | None = None,
    ) -> Tensor:
        """Run every layer; the caches hold one entry per layer when decoding."""
        self._check_caches("self_caches", self_caches)
        self._check_caches("cross_caches", cross_caches)
        first = self.layers[0]
        tgt_mask, causal = first.self_attention_mask(
            x, tgt_mask, True, None if self_caches is None else self_caches[0]
        )
        for i, layer in enumerate(self.layers):
            x = layer.block(
                x,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                causal=causal,
                self_cache=None if self_caches is None else self_caches[i],
                cross_cache=None if cross_caches is None else cross_caches[i],
            )
        return x if self.norm is None else self.norm(x)
