"""`multihead.attention_weights` (weights.tiled_weights): the weights of chosen rows and heads,
recomputed from the tiled kernel's log-sum-exp, equal the float64 reference kernel's weights.

conftest's tiny tiles (2 queries × 3 keys) make each lse the merge of many tiles.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to, make_qkv, reference64

import multihead
from multihead import masks
from multihead.kernels import tiled
from multihead.kernels import weights as weights_module

Q_LEN, K_LEN = 9, 11

# name → (tiled kwargs, reference kwargs)
CASES = {
    "none": ({}, {}),
    "causal": ({"mask": masks.causal(Q_LEN, K_LEN)}, {"causal": True}),
    "padding_with_empty_row": (
        {"mask": masks.padding([K_LEN, 0], K_LEN, q_len=Q_LEN)},
        {"mask": masks.padding([K_LEN, 0], K_LEN, q_len=Q_LEN)},
    ),
    "sliding_window": (
        {"mask": masks.sliding_window(Q_LEN, K_LEN, window=3, align="bottom-right")},
        {"mask": masks.sliding_window(Q_LEN, K_LEN, window=3, align="bottom-right")},
    ),
    "softcap_causal": (
        {"mask": masks.causal(Q_LEN, K_LEN), "softcap": 2.0},
        {"causal": True, "softcap": 2.0},
    ),
}

SELECTIONS = {
    "all": (None, None),
    "slices": (slice(2, 8, 2), slice(1, 3)),
    "indices": (torch.tensor([8, 0, 5]), torch.tensor([3, 0])),
    "negative": (torch.tensor([-1]), [-4]),
}


def _as_index(selection, size: int) -> torch.Tensor:
    if selection is None or isinstance(selection, slice):
        return torch.arange(size)[selection or slice(None)]
    return torch.as_tensor(selection)


def _expected(q, k, v, rows, heads, **kwargs):
    _, weights = reference64(q, k, v, return_weights=True, **kwargs)
    return weights[:, _as_index(heads, q.shape[1])][:, :, _as_index(rows, q.shape[2])]


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weights_match_float64_reference(case, selection, kv_heads, dtype, gen):
    q, k, v = make_qkv(
        heads=4, kv_heads=kv_heads, q_len=Q_LEN, k_len=K_LEN, head_dim=8, value_dim=8,
        dtype=dtype, generator=gen,
    )  # fmt: skip
    tiled_kwargs, reference_kwargs = CASES[case]
    rows, heads = SELECTIONS[selection]
    _, lse = tiled.tiled_attention(q, k, v, **tiled_kwargs)
    got = multihead.attention_weights(q, k, lse, rows=rows, heads=heads, **tiled_kwargs)
    expected = _expected(q, k, v, rows, heads, **reference_kwargs)
    assert got.shape == expected.shape
    assert got.dtype == torch.float32
    assert_close_to(got, expected, dtype)


def test_empty_rows_get_zero_weights_and_others_sum_to_one(gen):
    q, k, v = make_qkv(q_len=Q_LEN, k_len=K_LEN, generator=gen)
    mask = masks.padding([K_LEN, 0], K_LEN, q_len=Q_LEN) & masks.causal(Q_LEN, K_LEN)
    _, lse = tiled.tiled_attention(q, k, v, mask=mask)
    weights = weights_module.tiled_weights(q, k, lse, rows=slice(0, 4), mask=mask)
    assert torch.isfinite(weights).all()
    assert (weights[1] == 0).all()
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(4, 4))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_dense_bias_with_a_structured_mask(kind, gen):
    q, k, v = make_qkv(heads=4, kv_heads=2, q_len=Q_LEN, k_len=K_LEN, generator=gen)
    if kind == "bool":
        bias = torch.rand(2, 4, Q_LEN, K_LEN, generator=gen) > 0.3
        bias[0, 1, 4] = False  # an empty row
    else:
        bias = torch.randn(2, 1, Q_LEN, K_LEN, generator=gen)
    causal = masks.causal(Q_LEN, K_LEN)
    _, lse = tiled.tiled_attention(q, k, v, mask=causal, bias=bias)
    rows, heads = torch.tensor([4, 7]), slice(1, 4)
    got = weights_module.tiled_weights(q, k, lse, rows=rows, heads=heads, mask=causal, bias=bias)
    expected = _expected(q, k, v, rows, heads, mask=bias, causal=True)
    assert_close_to(got, expected, torch.float32)


def test_float64_is_exact_and_differentiable(gen):
    q, k, v = make_qkv(q_len=Q_LEN, k_len=K_LEN, dtype=torch.float64, generator=gen)
    _, lse = tiled.tiled_attention(q, k, v, mask=masks.causal(Q_LEN, K_LEN))
    q.requires_grad_()
    got = weights_module.tiled_weights(q, k, lse, heads=[2], mask=masks.causal(Q_LEN, K_LEN))
    assert got.dtype == torch.float64
    assert_close_to(got, _expected(q, k, v, None, [2], causal=True), torch.float64)
    got.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_only_the_requested_scores_are_built(monkeypatch, gen):
    q, k, v = make_qkv(q_len=64, k_len=64, generator=gen)
    _, lse = tiled.tiled_attention(q, k, v)
    shapes = []
    original = weights_module._scores

    def recording(q, k, *args):
        shapes.append((q.shape[1], q.shape[2], k.shape[2]))
        return original(q, k, *args)

    monkeypatch.setattr(weights_module, "_scores", recording)
    weights = weights_module.tiled_weights(q, k, lse, rows=slice(10, 13), heads=[1])
    assert weights.shape == (2, 1, 3, 64)
    assert shapes == [(1, 3, 64)]


def test_bad_arguments_are_refused(gen):
    q, k, v = make_qkv(q_len=Q_LEN, k_len=K_LEN, generator=gen)
    _, lse = tiled.tiled_attention(q, k, v)
    with pytest.raises(ValueError, match="lse has shape"):
        weights_module.tiled_weights(q, k, lse[..., :-1])
    with pytest.raises(TypeError, match="rows must be"):
        weights_module.tiled_weights(q, k, lse, rows=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="heads must be in"):
        weights_module.tiled_weights(q, k, lse, heads=[4])
    with pytest.raises(ValueError, match="mask is"):
        weights_module.tiled_weights(q, k, lse, mask=masks.causal(Q_LEN))
