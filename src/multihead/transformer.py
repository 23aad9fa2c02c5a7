"""The Transformer's layers (Vaswani et al., 2017, §3.1), in the paper's order.

Each sublayer (self-attention, cross-attention, feed-forward) sits in a residual connection
with dropout and a norm. ``norm_first=False`` is the paper's post-norm,
``x = norm(x + sublayer(x))``; ``norm_first=True`` (default) is pre-norm,
``x = x + sublayer(norm(x))``, which trains deep stacks without warm-up tricks and needs a
final norm after the stack. Inputs are (batch, seq, d_model); masks are True = may attend.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .cache import CrossAttentionCache, KVCache
from .masks import Mask
from .multi_head_attention import MultiHeadAttention

Activation = Literal["relu", "gelu"]
NormKind = Literal["layernorm", "rmsnorm"]

__all__ = ["Decoder", "DecoderLayer", "Encoder", "EncoderLayer", "FeedForward"]


def make_norm(kind: str, d_model: int, eps: float, bias: bool = True) -> nn.Module:
    """LayerNorm (the paper's) or RMSNorm (no centring, no bias: cheaper, as in LLaMA)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class FeedForward(nn.Module):
    """Position-wise feed-forward network: FFN(x) = act(x W1 + b1) W2 + b2 (§3.3)."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: Activation = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.activation = activation
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(self.linear1(x)) if self.activation == "relu" else F.gelu(self.linear1(x))
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

    With ``causal=True`` in forward it is also a decoder-only (GPT) block.
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
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        attn = {"num_kv_heads": num_kv_heads, "bias": bias, "dropout": dropout, "qk_norm": qk_norm}
        self.self_attn = MultiHeadAttention(d_model, num_heads, **attn)
        self.feed_forward = FeedForward(d_model, dim_feedforward, dropout, activation, bias)
        self.norm1 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.norm2 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (batch, seq, d_model) → same shape. ``cache`` decodes causally step by step."""

        def self_attention(h: Tensor) -> Tensor:
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


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder memory, then feed-forward."""

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
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        attn = {"num_kv_heads": num_kv_heads, "bias": bias, "dropout": dropout, "qk_norm": qk_norm}
        self.self_attn = MultiHeadAttention(d_model, num_heads, **attn)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, **attn)
        self.feed_forward = FeedForward(d_model, dim_feedforward, dropout, activation, bias)
        self.norm1 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.norm2 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.norm3 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        tgt_mask: Mask | Tensor | None = None,
        memory_mask: Mask | Tensor | None = None,
        causal: bool = True,
        self_cache: KVCache | None = None,
        cross_cache: CrossAttentionCache | None = None,
    ) -> Tensor:
        """x (batch, tgt_len, d_model), memory (batch, src_len, d_model) → like x.

        ``memory`` may be None once ``cross_cache`` holds its keys and values.
        """
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
            )
            for _ in range(num_layers)
        )
        self.norm = make_norm(norm, d_model, layer_norm_eps, bias) if norm_first else None


class Encoder(_Stack):
    """A stack of ``num_layers`` EncoderLayers (plus a final norm when pre-norm)."""

    layer_class = EncoderLayer

    def forward(
        self,
        x: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        causal: bool = False,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """Run every layer; ``caches`` holds one KVCache per layer when decoding."""
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches has {len(caches)} entries but there are {len(self.layers)}")
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, causal=causal, cache=None if caches is None else caches[i])
        return x if self.norm is None else self.norm(x)


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
        self_caches: list[KVCache] | None = None,
        cross_caches: list[CrossAttentionCache] | None = None,
    ) -> Tensor:
        """Run every layer; the caches hold one entry per layer when decoding."""
        n = len(self.layers)
        for name, caches in (("self_caches", self_caches), ("cross_caches", cross_caches)):
            if caches is not None and len(caches) != n:
                raise ValueError(f"{name} has {len(caches)} entries but there are {n} layers")
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                self_cache=None if self_caches is None else self_caches[i],
                cross_cache=None if cross_caches is None else cross_caches[i],
            )
        return x if self.norm is None else self.norm(x)
