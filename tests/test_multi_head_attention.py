"""`MultiHeadAttention` against torch.nn.MultiheadAttention with the same weights, and against
hand computations for what torch does not have (GQA, QK-norm, soft-capping)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_to, naive_attention, randn
from torch import nn

from multihead import MultiHeadAttention, attention, masks

E, H = 16, 4  # embed_dim, num_heads: head_dim 4
FP32 = {"atol": 2e-5, "rtol": 2e-5}  # fp32 through three matmuls and a softmax


def randomize(module: nn.Module, gen: torch.Generator, std: float = 0.3) -> nn.Module:
    """Non-zero values everywhere (biases and norm weights too), so copying is really tested."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)
            if param.ndim == 1 and param.shape[0] == module.head_dim:  # RMSNorm weights
                param.add_(1.0)
    return module


def torch_twin(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    """torch's nn.MultiheadAttention holding exactly our weights."""
    bias = ours.out_proj.bias is not None
    kdim = None if ours.fused else ours.kdim
    vdim = None if ours.fused else ours.vdim
    theirs = nn.MultiheadAttention(
        ours.embed_dim,
        ours.num_heads,
        batch_first=True,
        bias=bias,
        kdim=kdim,
        vdim=vdim,
        dtype=ours.out_proj.weight.dtype,
    )
    with torch.no_grad():
        if ours.fused:
            theirs.in_proj_weight.copy_(ours.in_proj.weight)
            if bias:
                theirs.in_proj_bias.copy_(ours.in_proj.bias)
        else:
            theirs.q_proj_weight.copy_(ours.q_proj.weight)
            theirs.k_proj_weight.copy_(ours.k_proj.weight)
            theirs.v_proj_weight.copy_(ours.v_proj.weight)
            if bias:
                theirs.in_proj_bias.copy_(
                    torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias])
                )
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        if bias:
            theirs.out_proj.bias.copy_(ours.out_proj.bias)
    return theirs.eval()


def pair(gen, **kwargs) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    ours = randomize(MultiHeadAttention(E, H, **kwargs), gen).eval()
    return ours, torch_twin(ours)


def x_of(*shape: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return randn(*shape, generator=gen, dtype=dtype)


# -- against torch.nn.MultiheadAttention ---------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_torch(bias, gen):
    ours, theirs = pair(gen, bias=bias)
    x = x_of(2, 5, E, gen=gen)
    out, weights = ours(x, need_weights="mean")
    expected, expected_weights = theirs(x, x, x, need_weights=True)
    torch.testing.assert_close(out, expected, **FP32)
    torch.testing.assert_close(weights, expected_weights, **FP32)
    torch.testing.assert_close(ours(x), expected, **FP32)  # the sdpa path agrees too


def test_cross_attention_over_one_memory_matches_torch(gen):
    ours, theirs = pair(gen)
    x, memory = x_of(2, 3, E, gen=gen), x_of(2, 6, E, gen=gen)
    expected, _ = theirs(x, memory, memory, need_weights=False)
    torch.testing.assert_close(ours(x, memory), expected, **FP32)
    torch.testing.assert_close(ours(x, memory, memory), expected, **FP32)


def test_cross_attention_with_separate_key_and_value_matches_torch(gen):
    ours, theirs = pair(gen)
    x, key, value = x_of(2, 3, E, gen=gen), x_of(2, 6, E, gen=gen), x_of(2, 6, E, gen=gen)
    expected, _ = theirs(x, key, value, need_weights=False)
    torch.testing.assert_close(ours(x, key, value), expected, **FP32)


def test_kdim_vdim_match_torch(gen):
    ours, theirs = pair(gen, kdim=12, vdim=10)
    assert not ours.fused
    x, key, value = x_of(2, 3, E, gen=gen), x_of(2, 6, 12, gen=gen), x_of(2, 6, 10, gen=gen)
    out, weights = ours(x, key, value, need_weights="mean")
    expected, expected_weights = theirs(x, key, value)
    torch.testing.assert_close(out, expected, **FP32)
    torch.testing.assert_close(weights, expected_weights, **FP32)


def test_causal_matches_torch(gen):
    ours, theirs = pair(gen)
    x = x_of(2, 6, E, gen=gen)
    blocked = torch.ones(6, 6, dtype=torch.bool).triu(1)  # torch: True = may NOT attend
    expected, expected_weights = theirs(x, x, x, attn_mask=blocked)
    out, weights = ours(x, causal=True, need_weights="mean")
    torch.testing.assert_close(ours(x, causal=True), expected, **FP32)
    torch.testing.assert_close(out, expected, **FP32)
    torch.testing.assert_close(weights, expected_weights, **FP32)


def test_padding_mask_matches_torch_key_padding_mask(gen):
    ours, theirs = pair(gen)
    x, memory = x_of(3, 4, E, gen=gen), x_of(3, 6, E, gen=gen)
    lengths = torch.tensor([6, 2, 4])
    key_padding_mask = torch.arange(6).view(1, -1) >= lengths.view(-1, 1)  # True = ignore
    expected, expected_weights = theirs(x, memory, memory, key_padding_mask=key_padding_mask)
    mask = masks.padding(lengths, max_len=6, q_len=4)
    out, weights = ours(x, memory, mask=mask, need_weights="mean")
    torch.testing.assert_close(out, expected, **FP32)
    torch.testing.assert_close(weights, expected_weights, **FP32)
    torch.testing.assert_close(ours(x, memory, mask=mask), expected, **FP32)
    # The same mask as a raw boolean tensor in our polarity (True = may attend).
    raw = (~key_padding_mask).view(3, 1, 1, 6).expand(3, 1, 4, 6)
    torch.testing.assert_close(ours(x, memory, mask=raw), expected, **FP32)


def test_causal_and_padding_match_torch(gen):
    ours, theirs = pair(gen)
    x = x_of(2, 5, E, gen=gen)
    lengths = torch.tensor([5, 3])
    key_padding_mask = torch.arange(5).view(1, -1) >= lengths.view(-1, 1)
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected, _ = theirs(x, x, x, attn_mask=blocked, key_padding_mask=key_padding_mask)
    got = ours(x, mask=masks.padding(lengths), causal=True)
    torch.testing.assert_close(got, expected, **FP32)


def test_float_bias_matches_torch_float_attn_mask(gen):
    ours, theirs = pair(gen)
    x = x_of(2, 5, E, gen=gen)
    bias = x_of(5, 5, gen=gen)  # an additive bias means the same in both libraries
    expected, _ = theirs(x, x, x, attn_mask=bias)
    torch.testing.assert_close(ours(x, mask=bias), expected, **FP32)


def test_per_head_weights_match_torch(gen):
    ours, theirs = pair(gen)
    x, memory = x_of(2, 3, E, gen=gen), x_of(2, 6, E, gen=gen)
    expected, expected_weights = theirs(x, memory, memory, average_attn_weights=False)
    out, weights = ours(x, memory, need_weights="per_head")
    assert weights.shape == (2, H, 3, 6)
    torch.testing.assert_close(out, expected, **FP32)
    torch.testing.assert_close(weights, expected_weights, **FP32)
    _, mean = ours(x, memory, need_weights="mean")
    torch.testing.assert_close(mean, weights.mean(1))


def test_backward_matches_torch(gen):
    ours, theirs = pair(gen)
    ours.train(), theirs.train()  # dropout is 0: training only enables autograd-friendly paths
    x = x_of(2, 5, E, gen=gen)
    cotangent = x_of(2, 5, E, gen=gen)
    (ours(x, causal=True) * cotangent).sum().backward()
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(1)
    (theirs(x, x, x, attn_mask=blocked, need_weights=False)[0] * cotangent).sum().backward()
    torch.testing.assert_close(ours.in_proj.weight.grad, theirs.in_proj_weight.grad, **FP32)
    torch.testing.assert_close(ours.in_proj.bias.grad, theirs.in_proj_bias.grad, **FP32)
    torch.testing.assert_close(ours.out_proj.weight.grad, theirs.out_proj.weight.grad, **FP32)


def test_bfloat16_module_matches_float64(gen):
    ours = randomize(MultiHeadAttention(E, H), gen).eval()
    low = MultiHeadAttention(E, H, dtype=torch.bfloat16).eval()
    low.load_state_dict(ours.state_dict())
    high = MultiHeadAttention(E, H, dtype=torch.float64).eval()
    high.load_state_dict(low.state_dict())  # the same bf16-rounded weights, in float64
    x = x_of(2, 5, E, gen=gen, dtype=torch.bfloat16)
    out = low(x, causal=True)
    assert out.dtype == torch.bfloat16
    assert_close_to(out, high(x.double(), causal=True), torch.bfloat16)


# -- against hand computations -------------------------------------------------------------------
def _heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int):
    """Project and split: (B, S, F) → (B, heads, S, head_dim), written out."""
    y = x @ weight.T + (0 if bias is None else bias)
    return y.view(*x.shape[:2], heads, -1).transpose(1, 2)


def _hand_forward(m: MultiHeadAttention, x, memory, allowed=None, softcap=None, qk_norm=False):
    """The layer by hand in float64; key/value heads are repeated for GQA. (output, weights)."""
    hd, kv = m.head_dim, m.num_kv_heads * m.head_dim
    w, b = m.in_proj.weight, m.in_proj.bias
    q = _heads(x, w[:E], b[:E], m.num_heads)
    k = _heads(memory, w[E : E + kv], b[E : E + kv], m.num_kv_heads)
    v = _heads(memory, w[E + kv :], b[E + kv :], m.num_kv_heads)
    if qk_norm:
        eps = torch.finfo(q.dtype).eps
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps) * m.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps) * m.k_norm.weight
    group = m.num_heads // m.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    heads, weights = naive_attention(q, k, v, allowed, softcap=softcap, scale=1 / math.sqrt(hd))
    merged = heads.transpose(1, 2).reshape(*x.shape[:2], E)
    return merged @ m.out_proj.weight.T + m.out_proj.bias, weights


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_matches_repeated_heads_by_hand(num_kv_heads, gen):
    m = randomize(MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, dtype=torch.float64), gen)
    m.eval()
    assert m.in_proj.weight.shape == (E + 2 * num_kv_heads * (E // H), E)
    x, memory = (
        x_of(2, 4, E, gen=gen, dtype=torch.float64),
        x_of(2, 6, E, gen=gen, dtype=torch.float64),
    )
    lengths = [6, 3]
    allowed = torch.arange(6).view(1, 1, 1, -1) < torch.tensor(lengths).view(-1, 1, 1, 1)
    expected, expected_weights = _hand_forward(m, x, memory, allowed)
    mask = masks.padding(lengths, max_len=6, q_len=4)
    out, weights = m(x, memory, mask=mask, need_weights="per_head")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weights, expected_weights, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(m(x, memory, mask=mask), expected, atol=1e-12, rtol=1e-10)


def test_gqa_self_attention_uses_reference_kernel_on_repeated_heads(gen):
    m = randomize(MultiHeadAttention(E, H, num_kv_heads=2), gen).eval()
    x = x_of(2, 5, E, gen=gen)
    q, k, v = m.in_proj(x).split([E, E // 2, E // 2], dim=-1)
    q, k, v = m.split_heads(q, 4), m.split_heads(k, 2), m.split_heads(v, 2)
    heads = attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True, kernel="reference"
    )
    expected = m.out_proj(m.merge_heads(heads))
    torch.testing.assert_close(m(x, causal=True), expected, **FP32)


def test_qk_norm_matches_manual_rmsnorm(gen):
    m = randomize(MultiHeadAttention(E, H, qk_norm=True, dtype=torch.float64), gen).eval()
    assert not torch.allclose(m.q_norm.weight, torch.ones(E // H, dtype=torch.float64))
    x = x_of(2, 5, E, gen=gen, dtype=torch.float64) * 5
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected, expected_weights = _hand_forward(m, x, x, causal, qk_norm=True)
    out, weights = m(x, causal=True, need_weights="per_head")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weights, expected_weights, atol=1e-12, rtol=1e-10)
    # Without the norm the same weights give a different layer.
    plain, _ = _hand_forward(m, x, x, causal, qk_norm=False)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_softcap_matches_hand_formula(gen):
    m = randomize(
        MultiHeadAttention(E, H, num_kv_heads=2, softcap=1.5, dtype=torch.float64), gen, std=1.0
    ).eval()
    x, memory = (
        x_of(2, 3, E, gen=gen, dtype=torch.float64),
        x_of(2, 4, E, gen=gen, dtype=torch.float64),
    )
    expected, expected_weights = _hand_forward(m, x, memory, softcap=1.5)
    out, weights = m(x, memory, need_weights="per_head")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weights, expected_weights, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(m(x, memory), expected, atol=1e-12, rtol=1e-10)
    uncapped, _ = _hand_forward(m, x, memory)
    assert not torch.allclose(out, uncapped, atol=1e-3)


# -- dropout -------------------------------------------------------------------------------------
def test_dropout_only_in_training(gen):
    m = randomize(MultiHeadAttention(E, H, dropout=0.5), gen)
    clean = MultiHeadAttention(E, H)
    clean.load_state_dict(m.state_dict())
    x = x_of(2, 6, E, gen=gen)

    m.eval()
    expected = clean.eval()(x)
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m(x), m(x))  # deterministic

    m.train()
    torch.manual_seed(0)
    first = m(x)
    torch.manual_seed(0)
    again = m(x)
    assert torch.equal(first, again)
    assert not torch.allclose(first, expected, atol=1e-3)
    # need_weights reports the weights before dropout: rows still sum to 1.
    torch.manual_seed(0)
    _, weights = m(x, need_weights="per_head")
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 6))

    clean.train()  # dropout=0 while training is the eval layer
    torch.testing.assert_close(clean(x), expected)


# -- init ----------------------------------------------------------------------------------------
def _assert_xavier_uniform(weight: torch.Tensor) -> None:
    fan_out, fan_in = weight.shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.9 * bound  # not a narrower distribution
    std = bound / math.sqrt(3.0)
    assert abs(weight.std().item() - std) < 0.05 * std


def test_init_fused(gen):
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4)
    assert torch.equal(m.in_proj.bias, torch.zeros(192))
    assert torch.equal(m.out_proj.bias, torch.zeros(64))
    _assert_xavier_uniform(m.in_proj.weight)
    # out_proj keeps nn.Linear's default, as torch's MultiheadAttention: U(-1/√64, 1/√64).
    assert m.out_proj.weight.abs().max() <= 1 / 8
    assert abs(m.out_proj.weight.std().item() - 1 / 8 / math.sqrt(3)) < 0.1 / 8 / math.sqrt(3)
    assert m.q_norm is None and m.k_norm is None


def test_init_separate_projections():
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4, kdim=48, vdim=32, num_kv_heads=2)
    for linear in (m.q_proj, m.k_proj, m.v_proj):
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
        _assert_xavier_uniform(linear.weight)
    assert m.k_proj.weight.shape == (32, 48) and m.v_proj.weight.shape == (32, 32)


def test_init_without_bias():
    m = MultiHeadAttention(16, 4, bias=False)
    assert m.in_proj.bias is None and m.out_proj.bias is None
    assert len(list(m.parameters())) == 2


# -- errors --------------------------------------------------------------------------------------
def test_embed_dim_not_divisible_raises():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(10, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_kv_heads": 3}, ValueError, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
        ({"num_kv_heads": 0}, ValueError, "num_kv_heads must be positive"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"softcap": 0.0}, ValueError, "softcap must be positive"),
        ({"kdim": 0}, ValueError, "kdim must be positive"),
        ({"vdim": 2.5}, TypeError, "vdim must be an int"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiHeadAttention(16, 4, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (((2, 3, 64), (2, 5, 48)), {}, ValueError, "key has 48 features but the layer expects 64"),
        (((2, 3, 32),), {}, ValueError, "query has 32 features but the layer expects 64"),
        (((2, 3, 64), (2, 5, 64), (2, 5, 60)), {}, ValueError, "value has 60 features"),
        (((2, 3, 64), (3, 5, 64)), {}, ValueError, "batch sizes differ"),
        (((2, 3, 64), (2, 5, 64), (2, 4, 64)), {}, ValueError, "key has 5 positions"),
        (((3, 64),), {}, ValueError, r"query must be 3-D \(batch, seq, features\)"),
        (((2, 3, 64),), {"need_weights": True}, ValueError, "need_weights must be"),
        (((2, 3, 64),), {"mask": torch.ones(2, 3, 3, dtype=torch.bool)}, ValueError, "mask"),
        (((2, 3, 64),), {"mask": masks.padding([1, 2, 3])}, ValueError, "batch size 3"),
    ],
)
def test_bad_forward_arguments(args, kwargs, error, match):
    m = MultiHeadAttention(64, 4)
    tensors = [torch.randn(shape) for shape in args]
    with pytest.raises(error, match=match):
        m(*tensors, **kwargs)


def test_non_tensor_input_raises():
    m = MultiHeadAttention(16, 4)
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        m(torch.randn(1, 2, 16), [[0.0] * 16])


# -- positions as score mods ----------------------------------------------------------------------
def dense_position_oracle(layer: MultiHeadAttention, x: torch.Tensor, allowed: torch.Tensor):
    """The dense-bias path: `positional.ALiBi` / `RelativePositionBias` build the
    (1, heads, L, L) bias, −inf where ``allowed`` is False, on the float64 reference kernel."""
    q, k, v = layer._heads(*layer._project(x, x, x))
    n = x.shape[1]
    if layer.alibi is not None:
        bias = layer.alibi(n, n, torch.float64)
    else:
        bias = layer.relative_bias(n, n)
    heads = attention(q, k, v, mask=bias.masked_fill(~allowed, -math.inf), kernel="reference")
    return layer.out_proj(layer.merge_heads(heads))


@pytest.mark.parametrize("kind", ["alibi", "relative"])
@pytest.mark.parametrize("kernel", ["sdpa", "tiled"])
def test_position_score_mods_equal_the_dense_bias(kind, kernel, gen, monkeypatch):
    from multihead import functional, positional
    from multihead.kernels import tiled

    torch.manual_seed(0)
    layer = randomize(MultiHeadAttention(8, 2, positions=kind, dtype=torch.float64), gen)
    x = x_of(2, 11, 8, gen=gen, dtype=torch.float64).requires_grad_()
    allowed = masks.causal(11) & masks.padding([11, 7])
    expected = dense_position_oracle(layer, x, allowed.to_dense())
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()])

    if kernel == "tiled":  # a score mod then always runs per tile
        monkeypatch.setattr(tiled, "SCORE_MATRIX_BUDGET", 0)
    chosen: list[str] = []
    select = functional.select_kernel

    def spy(request, kernel="auto"):
        module = select(request, kernel)
        chosen.append(module.NAME)
        return module

    monkeypatch.setattr(functional, "select_kernel", spy)
    for module in (positional.ALiBi, positional.RelativePositionBias):  # no dense bias
        monkeypatch.setattr(module, "forward", lambda *a, **k: pytest.fail("dense bias built"))
    out = layer(x, mask=allowed)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert chosen == [kernel]
    assert_close_to(out, expected, torch.float64)
    for grad, want in zip(grads, expected_grads, strict=True):  # the T5 table's too
        assert_close_to(grad, want, torch.float64, grad=True)


@pytest.mark.parametrize("kind", ["alibi", "relative"])
def test_position_score_mod_with_a_float_and_a_tensor_mask_in_float32(kind, gen):
    layer = randomize(MultiHeadAttention(8, 2, positions=kind), gen).eval()
    x = x_of(2, 6, 8, gen=gen)
    allowed = (masks.causal(6) & masks.padding([6, 4])).to_dense()
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, -math.inf)
    expected = dense_position_oracle(layer.double(), x.double(), allowed).float()
    layer.float()
    torch.testing.assert_close(layer(x, mask=allowed), expected, **FP32)
    torch.testing.assert_close(layer(x, mask=additive), expected, **FP32)


def test_state_dict_keeps_the_relative_table():
    layer = MultiHeadAttention(8, 2, positions="relative")
    assert "relative_bias.embedding.weight" in layer.state_dict()
    assert not any(
        "alibi" in name for name in MultiHeadAttention(8, 2, positions="alibi").state_dict()
    )


def test_forward_packed_equals_forward_with_cu_seqlens(gen):
    layer = randomize(MultiHeadAttention(8, 2, positions="rope"), gen).eval()
    packed, cu = x_of(7, 8, gen=gen), torch.tensor([0, 3, 7])
    out = layer.forward_packed(packed, cu, causal=True)
    assert torch.equal(out, layer(packed, causal=True, cu_seqlens=cu))
    torch.testing.assert_close(out[3:], layer(packed[None, 3:], causal=True)[0], **FP32)
