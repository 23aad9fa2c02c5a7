"""`from_transformers`: a transformers Llama or Mistral model as a `TransformerLM`.

Both are the modern decoder recipe (`LMConfig.modern`): RMSNorm before each sublayer,
SwiGLU, RoPE, GQA, no biases (Llama may have them on the attention and the MLP), Mistral
with a causal sliding window. transformers rotates with ``rotate_half``, features i and
i + head_dim/2 as a pair, as `RotaryEmbedding` does, so the weights copy without a
permutation. Whatever the conversion cannot reproduce is refused by name, never approximated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..models.lm import LMConfig, TransformerLM

__all__ = ["from_transformers"]

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


def _refuse(setting: str, value: object, why: str) -> ValueError:
    return ValueError(f"cannot convert: config.{setting}={value!r} ({why})")


def _rope_theta(config: Any) -> float:
    """RoPE's base θ; only the plain ("default") RoPE is implemented."""
    # transformers 5 keeps RoPE's settings in rope_parameters (rope_scaling is its old name).
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise _refuse("rope_parameters", rope, f"rope_type {kind!r}: only 'default' is implemented")
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise _refuse("partial_rotary_factor", factor, "RoPE rotates every feature here")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _lm_config(model: nn.Module) -> LMConfig:
    """Our config for ``model``'s, after refusing what it cannot express."""
    c = model.config
    if c.hidden_act != "silu":
        raise _refuse("hidden_act", c.hidden_act, "the MLP converts as SwiGLU, which needs 'silu'")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise _refuse("head_dim", head_dim, "heads must split hidden_size evenly")
    attention_bias = bool(getattr(c, "attention_bias", False))
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    window = (
        getattr(c, "sliding_window", None) if type(model).__name__.startswith("Mistral") else None
    )
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None:
        expected = "sliding_attention" if window is not None else "full_attention"
        if any(kind != expected for kind in layer_types):
            raise _refuse("layer_types", layer_types, f"every layer must be {expected!r}")
    eos = c.eos_token_id if isinstance(c.eos_token_id, int) else None
    return LMConfig.modern(
        c.vocab_size,
        d_model=c.hidden_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        num_layers=c.num_hidden_layers,
        dim_feedforward=c.intermediate_size,
        max_len=c.max_position_embeddings,
        norm_eps=float(c.rms_norm_eps),
        rope_base=_rope_theta(c),
        bias=mlp_bias,
        attention_bias=attention_bias,
        tie_embeddings=bool(c.tie_word_embeddings),
        window=window,
        eos_id=eos if eos is not None and 0 <= eos < c.vocab_size else None,
    )


def _cat(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """Stacked weights (and biases) of linear layers that our layer fuses into one."""
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    return weight, None if biases[0] is None else torch.cat(biases)


def _copy(ours: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    ours.weight.copy_(weight)
    if ours.bias is not None:
        assert bias is not None
        ours.bias.copy_(bias)


@torch.no_grad()
def from_transformers(model: nn.Module) -> TransformerLM:
    """A `TransformerLM` with the weights of an in-memory ``LlamaForCausalLM`` or
    ``MistralForCausalLM``, on its device and dtype, in eval mode.

    Its logits equal the model's (fp32, within 1e-4, tested) and its cached greedy
    ``generate`` gives the same tokens. ``eos_id`` is the model's ``eos_token_id`` when that
    is a single id. Raises ValueError naming the setting it cannot reproduce (RoPE scaling,
    partial rotary, another activation, mixed layer types).
    """
    if type(model).__name__ not in SUPPORTED:
        raise TypeError(
            f"model must be one of {SUPPORTED} (transformers), got {type(model).__name__}"
        )
    config = _lm_config(model)
    weight = model.model.embed_tokens.weight
    with torch.device(weight.device):
        ours = TransformerLM(config).to(weight.dtype)
    ours.embedding.weight.copy_(weight)
    for block, theirs in zip(ours.blocks.layers, model.model.layers, strict=True):
        attn, mlp = theirs.self_attn, theirs.mlp
        _copy(block.self_attn.in_proj, *_cat(attn.q_proj, attn.k_proj, attn.v_proj))
        _copy(block.self_attn.out_proj, attn.o_proj.weight, attn.o_proj.bias)
        _copy(block.feed_forward.linear1, *_cat(mlp.gate_proj, mlp.up_proj))
        _copy(block.feed_forward.linear2, mlp.down_proj.weight, mlp.down_proj.bias)
        block.norm1.weight.copy_(theirs.input_layernorm.weight)
        block.norm2.weight.copy_(theirs.post_attention_layernorm.weight)
    assert ours.blocks.norm is not None
    ours.blocks.norm.weight.copy_(model.model.norm.weight)
    if ours.head is not None:
        ours.head.weight.copy_(model.lm_head.weight)
    return ours.eval()
