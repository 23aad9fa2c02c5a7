"""Layers and stacks reach every attention option through one `AttentionConfig`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multihead import masks
from multihead.attention_config import AttentionConfig
from multihead.cache import KVCache, SlidingWindowKVCache
from multihead.transformer import (
    Decoder,
    DecoderLayer,
    DecoderOnly,
    DecoderOnlyLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
)

D, H, FF = 16, 4, 24


def band(q_len: int, window: int) -> torch.Tensor:
    """The sliding window written out: query i sees keys i - window + 1 .. i."""
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(q_len).unsqueeze(0)
    return (j <= i) & (j > i - window)


def twin(layer: torch.nn.Module, **changes: object) -> torch.nn.Module:
    """A layer of the same class with ``changes`` to its AttentionConfig and the same weights."""
    config = AttentionConfig(**{**layer.attention_config.__dict__, **changes})
    other = type(layer)(D, H, FF, 0.0, attention=config).eval()
    other.load_state_dict(layer.state_dict())
    return other


def test_every_option_reaches_the_attention() -> None:
    config = AttentionConfig(
        num_kv_heads=2, bias=False, qk_norm=True, softcap=7.0, positions="rope", rope_base=500.0
    )
    for layer in (
        EncoderLayer(D, H, FF, attention=config),
        DecoderLayer(D, H, FF, attention=config),
    ):
        attn = layer.self_attn
        assert (attn.num_kv_heads, attn.softcap, attn.positions) == (2, 7.0, "rope")
        assert attn.in_proj.bias is None and attn.out_proj.bias is None
        assert attn.q_norm is not None and attn.rotary.base == 500.0
        assert layer.feed_forward.linear1.bias is not None  # bias=None would follow the layer
    cross = DecoderLayer(D, H, FF, attention=config).cross_attn
    assert cross.positions is None and cross.num_kv_heads == 2 and cross.softcap == 7.0
    alibi = Encoder(2, D, H, FF, attention=AttentionConfig(positions="alibi"))
    assert all(layer.self_attn.alibi is not None for layer in alibi.layers)
    follows = EncoderLayer(D, H, FF, bias=False, attention=AttentionConfig(positions="relative"))
    assert follows.self_attn.in_proj.bias is None
    assert follows.self_attn.relative_bias is not None


def test_the_older_arguments_still_work_and_do_not_mix() -> None:
    layer = EncoderLayer(D, H, FF, 0.0, "relu", "rmsnorm", True, 1e-5, False, 2, True)
    assert layer.self_attn.num_kv_heads == 2 and layer.self_attn.q_norm is not None
    with pytest.raises(ValueError, match="num_kv_heads and qk_norm go inside attention"):
        EncoderLayer(D, H, FF, num_kv_heads=2, attention=AttentionConfig())
    with pytest.raises(TypeError, match="attention must be an AttentionConfig"):
        Encoder(1, D, H, FF, attention={"window": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window must be None or a positive int"):
        AttentionConfig(window=0)
    with pytest.raises(ValueError, match="positions must be"):
        AttentionConfig(positions="learned")  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [EncoderLayer, DecoderOnlyLayer])
def test_window_equals_the_written_out_band(cls: type[EncoderLayer]) -> None:
    torch.manual_seed(0)
    layer = cls(D, H, FF, 0.0, attention=AttentionConfig(window=3, positions="rope")).eval()
    plain = twin(layer, window=None)
    x = torch.randn(2, 9, D)
    expected = plain(x, mask=band(9, 3))
    torch.testing.assert_close(layer(x, causal=True), expected, atol=1e-6, rtol=1e-6)
    # Causal alone differs, so the window is really applied.
    assert not torch.allclose(plain(x, causal=True), expected, atol=1e-3)
    # A position's output ignores keys outside its window.
    changed = x.clone()
    changed[:, :4] = torch.randn(2, 4, D)
    torch.testing.assert_close(layer(changed, causal=True)[:, 6:], layer(x, causal=True)[:, 6:])


def test_window_joins_the_callers_mask_of_each_kind() -> None:
    torch.manual_seed(1)
    layer = EncoderLayer(D, H, FF, 0.0, attention=AttentionConfig(window=4)).eval()
    plain = twin(layer, window=None)
    x = torch.randn(2, 10, D)
    docs = torch.tensor([[0] * 6 + [1] * 4, [0] * 3 + [1] * 7])
    same_doc = docs.unsqueeze(2) == docs.unsqueeze(1)  # (2, 10, 10)
    expected = plain(x, mask=(same_doc & band(10, 4)).unsqueeze(1))
    for mask in (masks.documents(docs), same_doc.unsqueeze(1)):
        torch.testing.assert_close(layer(x, mask=mask, causal=True), expected)
    additive = torch.zeros(2, 1, 10, 10).masked_fill(~same_doc.unsqueeze(1), -math.inf)
    torch.testing.assert_close(layer(x, mask=additive, causal=True), expected)
    with pytest.raises(ValueError, match="causal sliding window"):
        layer(x)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 10\)"):
        layer(x, mask=torch.ones(1, 10, dtype=torch.bool), causal=True)


def test_a_stack_builds_the_window_once(monkeypatch) -> None:
    import multihead.attention_config as attention_config

    calls = []
    original = masks.sliding_window

    def counting(*args: object, **kwargs: object) -> masks.Mask:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_config.masks_lib, "sliding_window", counting)
    stack = DecoderOnly(3, D, H, FF, 0.0, attention=AttentionConfig(window=2)).eval()
    x = torch.randn(1, 6, D)
    out = stack(x)
    assert len(calls) == 1
    by_layer = x
    for layer in stack.layers:
        by_layer = layer(by_layer)
    assert len(calls) == 4
    torch.testing.assert_close(out, stack.norm(by_layer))
    stack(torch.randn(1, 2, D))  # the window holds every key: no mask is built
    assert len(calls) == 4


@pytest.mark.parametrize("kind", ["ring", "full"])
def test_cached_decoding_of_a_windowed_stack_equals_the_full_pass(kind: str) -> None:
    """The window comes from the ring buffer (`new_caches`) or, over a full KVCache, from the
    bottom-right band the stack adds."""
    torch.manual_seed(2)
    config = AttentionConfig(window=5, positions="rope", num_kv_heads=2)
    stack = DecoderOnly(2, D, H, FF, 0.0, attention=config).eval()
    x = torch.randn(2, 12, D)
    full = stack(x)
    if kind == "ring":
        caches = stack.new_caches(2, 12)
        assert {type(c) for c in caches} == {SlidingWindowKVCache}
        assert {type(c) for c in stack.new_caches(2, 5)} == {KVCache}  # window holds all
    else:
        caches = [KVCache(2, 2, 12, D // H) for _ in stack.layers]
    steps = [stack(x[:, :3], caches=caches)]  # a prompt, then one token at a time
    steps += [stack(x[:, t : t + 1], caches=caches) for t in range(3, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_decoder_layer_window_is_on_self_attention_only() -> None:
    torch.manual_seed(3)
    config = AttentionConfig(window=3, positions="rope")
    stack = Decoder(2, D, H, FF, 0.0, attention=config).eval()
    plain = Decoder(2, D, H, FF, 0.0, attention=AttentionConfig(positions="rope")).eval()
    plain.load_state_dict(stack.state_dict())
    x, memory = torch.randn(2, 8, D), torch.randn(2, 5, D)
    expected = plain(x, memory, tgt_mask=band(8, 3))
    torch.testing.assert_close(stack(x, memory), expected, atol=1e-6, rtol=1e-6)
    layer_out = stack.layers[0](x, memory)
    torch.testing.assert_close(layer_out, plain.layers[0](x, memory, tgt_mask=band(8, 3)))


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_feed_forward_is_shazeers(activation: str) -> None:
    torch.manual_seed(4)
    ff = FeedForward(D, FF, 0.0, activation, bias=False)  # type: ignore[arg-type]
    x = torch.randn(3, D)
    gate_w, up_w = ff.linear1.weight[:FF], ff.linear1.weight[FF:]
    act = F.silu if activation == "swiglu" else F.gelu
    expected = (act(x @ gate_w.T) * (x @ up_w.T)) @ ff.linear2.weight.T
    torch.testing.assert_close(ff(x), expected)
    assert ff.linear1.weight.shape == (2 * FF, D)
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(D, FF, activation="tanh")  # type: ignore[arg-type]
