"""RoPE, ALiBi and T5 relative bias: their defining properties, and as MultiHeadAttention
options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import multihead
from multihead import KVCache, MultiHeadAttention, masks
from multihead.positional import (
    ALiBi,
    RelativePositionBias,
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    relative_position_bucket,
)

# -- RoPE ------------------------------------------------------------------------------------


def rope_by_hand(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE as complex multiplication: feature pair (i, i + d/2) is z_i, rotated by m·θ_i."""
    half = x.shape[-1] // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(
        torch.ones((), dtype=torch.float64), positions.double().unsqueeze(-1) * theta
    )
    return torch.cat([z.real, z.imag], -1)


def test_rope_matches_the_rotation_by_hand() -> None:
    rope = RotaryEmbedding(2)
    rotated = rope(torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(rotated[1], torch.tensor([math.cos(1), math.sin(1)]).double())
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(RotaryEmbedding(8)(x, offset=4), rope_by_hand(x, torch.arange(4, 9)))


def test_rope_scores_depend_only_on_the_distance() -> None:
    rope = RotaryEmbedding(16)
    q, k = torch.randn(2, 16, dtype=torch.float64)
    for m, n in [(0, 0), (5, 2), (2, 5), (40, 1)]:
        scores = [
            rope(q.view(1, 16), offset=m + shift) @ rope(k.view(1, 16), offset=n + shift).T
            for shift in (0, 3, 1000)
        ]
        for score in scores[1:]:
            torch.testing.assert_close(score, scores[0])
    norms = rope(torch.stack([q, q]), offset=7).norm(dim=-1)  # a rotation keeps the length
    torch.testing.assert_close(norms, q.norm().expand(2))


def test_rope_with_offset_equals_the_full_sequence() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 10, 8)
    full = rope(x)
    torch.testing.assert_close(rope(x[:, :, 6:], offset=6), full[:, :, 6:])
    torch.testing.assert_close(rope(x, positions=torch.arange(10)), full)
    torch.testing.assert_close(rope(x, positions=torch.arange(10).expand(2, 10)), full)
    assert rope(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        rope(x, offset=-1)
    with pytest.raises(ValueError, match="head_dim=8"):
        rope(torch.zeros(2, 4))


# -- ALiBi -----------------------------------------------------------------------------------


def paper_slopes(n: int) -> list[float]:
    """The ALiBi authors' get_slopes, verbatim in spirit: geometric from 2^(-8/n)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_follow_the_paper() -> None:
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]  # 1/2, 1/4, ..., 1/256
    assert alibi_slopes(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    for n in (1, 2, 5, 12, 16):
        torch.testing.assert_close(alibi_slopes(n), torch.tensor(paper_slopes(n)).double())


def test_alibi_bias_is_minus_slope_times_distance() -> None:
    bias = alibi_bias(2, 3, 3)  # 2 heads: slopes 2^-4, 2^-8
    distance = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(bias[0, 0], -distance / 16)
    torch.testing.assert_close(bias[0, 1], -distance / 256)
    # A decoding step (1 query after 3 cached keys) is the last row of the full bias.
    torch.testing.assert_close(alibi_bias(2, 1, 4), alibi_bias(2, 4, 4)[:, :, 3:])
    torch.testing.assert_close(ALiBi(2)(1, 4), alibi_bias(2, 1, 4))


# -- T5 relative position bias ---------------------------------------------------------------


def test_relative_buckets_match_a_hand_computation() -> None:
    distances = torch.tensor([0, -1, -7, -8, -20, -200, 1, 20, 200])
    # 32 buckets, bidirectional: 16 a side, 8 exact; beyond that 8 + ⌊log(d/8)/log(16)·8⌋:
    # d=8 → 8, d=20 → 8 + ⌊2.64⌋ = 10, d=200 → 8 + ⌊9.29⌋ = 17, capped at 15. Keys after the
    # query (positive distance) use the upper 16.
    bidirectional = [0, 1, 7, 8, 10, 15, 17, 26, 31]
    assert relative_position_bucket(distances).tolist() == bidirectional
    # Causal: all 32 for the past, 16 exact; d=20 → 16 + ⌊log(20/16)/log(8)·16⌋ = 17.
    causal = [0, 1, 7, 8, 17, 31, 0, 0, 0]
    assert relative_position_bucket(distances, bidirectional=False).tolist() == causal
    with pytest.raises(TypeError, match="integer"):
        relative_position_bucket(distances.float())


def test_relative_bias_reads_the_table_by_bucket() -> None:
    module = RelativePositionBias(2, num_buckets=8, max_distance=16)
    bias = module(3, 4)  # query i at position i + 1
    buckets = relative_position_bucket(
        torch.arange(4).view(1, 4) - torch.arange(1, 4).view(3, 1), num_buckets=8, max_distance=16
    )
    torch.testing.assert_close(bias[0], module.embedding.weight[buckets].permute(2, 0, 1))
    with pytest.raises(ValueError, match="max_distance"):
        RelativePositionBias(2, num_buckets=32, max_distance=8)


# -- as MultiHeadAttention options -----------------------------------------------------------


def attention_by_hand(layer: MultiHeadAttention, x: Tensor, keep: Tensor) -> Tensor:
    """softmax(q kᵀ/√d + position bias, masked by ``keep``) v, then W_o, for one sequence."""
    heads, d, seq = layer.num_heads, layer.head_dim, x.shape[1]
    q, k, v = (x[0] @ layer.in_proj.weight.T).split(layer.embed_dim, -1)
    q, k, v = (t.view(seq, heads, d).transpose(0, 1) for t in (q, k, v))
    i, j = torch.arange(seq).view(-1, 1), torch.arange(seq).view(1, -1)
    bias = torch.zeros(heads, seq, seq, dtype=x.dtype)
    if layer.positions == "rope":
        q, k = rope_by_hand(q, torch.arange(seq)), rope_by_hand(k, torch.arange(seq))
    elif layer.positions == "alibi":
        slopes = torch.tensor([2.0**-4, 2.0**-8], dtype=x.dtype)  # 2 heads
        bias = -slopes.view(-1, 1, 1) * (i - j).abs()
    elif layer.positions == "relative":
        table = layer.relative_bias.embedding.weight
        bias = table[relative_position_bucket(j - i)].permute(2, 0, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) + bias
    weights = scores.masked_fill(~keep, -math.inf).softmax(-1)
    return ((weights @ v).transpose(0, 1).reshape(seq, -1) @ layer.out_proj.weight.T).unsqueeze(0)


@pytest.mark.parametrize("kind", ["rope", "alibi", "relative"])
def test_module_option_matches_a_hand_computation(kind: str) -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, bias=False, positions=kind, dtype=torch.float64)
    nn_init = layer.relative_bias.embedding.weight if kind == "relative" else None
    if nn_init is not None:
        torch.nn.init.normal_(nn_init)  # large enough to matter
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[True, True, True, False]])  # the last key is padding
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    out = layer(x, mask=masks.padding([3], max_len=4), causal=True)
    torch.testing.assert_close(out, attention_by_hand(layer, x, causal & padding))
    out.square().sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert f"positions={kind!r}" in repr(layer)


@pytest.mark.parametrize("kind", ["rope", "alibi", "relative"])
def test_module_option_with_kv_cache_equals_full(kind: str) -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, positions=kind).eval()
    x = torch.randn(2, 6, 16)
    full = layer(x, causal=True)
    cache = KVCache(2, 2, 6, 4)
    steps = [layer(x[:, :3], causal=True, cache=cache)]
    steps += [layer(x[:, i : i + 1], causal=True, cache=cache) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["alibi", "relative"])
def test_score_bias_combines_with_float_and_structured_masks(kind: str) -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, positions=kind).eval()
    x = torch.randn(2, 5, 8)
    allowed = masks.padding([5, 3])
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~allowed.to_dense(), -math.inf)
    by_mask = layer(x, mask=allowed, causal=True)
    torch.testing.assert_close(layer(x, mask=additive, causal=True), by_mask)
    torch.testing.assert_close(layer(x, mask=allowed.to_dense(), causal=True), by_mask)


def test_positions_are_validated() -> None:
    with pytest.raises(ValueError, match="positions must be None, 'rope'"):
        MultiHeadAttention(8, 2, positions="sinusoidal")
    layer = MultiHeadAttention(8, 2, positions="alibi")
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="is for self-attention"):
        layer(x, torch.randn(1, 4, 8))
    assert layer(x, x, x).shape == (1, 3, 8)  # the same tensor is self-attention


def test_exported() -> None:
    assert {"RotaryEmbedding", "ALiBi", "RelativePositionBias", "alibi_bias"} <= set(
        multihead.__all__
    )
