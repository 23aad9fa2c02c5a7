"""Score mods (FlexAttention's ``score_mod``) in every kernel, against dense float64 oracles.

The oracle adds a bias matrix built here by its formula (ALiBi: −slope·|j − i − offset|; T5:
the dense bias of `positional.RelativePositionBias` with the same table; soft-capping:
cap·tanh) to hand-computed scores; every kernel must agree with it, forward and backward,
the learned table's gradient included, with masks that cut tiles.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_to, make_qkv

import multihead
from multihead import masks, score_mods
from multihead.kernels import online_softmax
from multihead.positional import RelativePositionBias, alibi_slopes

HEADS, Q_LEN, K_LEN = 4, 9, 11


def oracle(q, k, v, bias: torch.Tensor | None, allowed: torch.Tensor | None, cap=None):
    """softmax(q·kᵀ/√d (+ bias, then capped) masked) v in float64; empty rows give 0."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.double()
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v


def alibi_matrix(heads: int, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
    slopes = alibi_slopes(heads).double()
    i = torch.arange(q_len).view(-1, 1)
    j = torch.arange(k_len).view(1, -1)
    return -slopes.view(1, -1, 1, 1) * (j - i - offset).abs().double()


MASKS = {
    "none": lambda: None,
    "causal": lambda: masks.causal(Q_LEN, K_LEN, align="bottom-right"),
    "window": lambda: masks.sliding_window(Q_LEN, K_LEN, window=4, align="bottom-right"),
    "padding": lambda: masks.padding([K_LEN, 5], max_len=K_LEN, q_len=Q_LEN),
}


def _inputs(dtype, gen, kv_heads=2):
    q, k, v = make_qkv(
        batch=2, heads=HEADS, kv_heads=kv_heads, q_len=Q_LEN, k_len=K_LEN, head_dim=8,
        value_dim=8, dtype=dtype, generator=gen,
    )  # fmt: skip
    return tuple(t.requires_grad_() for t in (q, k, v))


def _grads(out, inputs, cotangent):
    return torch.autograd.grad((out.double() * cotangent).sum(), inputs)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kernel", ["reference", "sdpa", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["written_out", "fused"])
def test_alibi_equals_the_dense_bias(mask_name, kernel, dtype, gen):
    q, k, v = _inputs(dtype, gen)
    mask = MASKS[mask_name]()
    mod = score_mods.alibi(HEADS, q_len=Q_LEN, k_len=K_LEN)
    out = multihead.attention(q, k, v, mask=mask, score_mod=mod, kernel=kernel)
    allowed = None if mask is None else mask.to_dense()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = oracle(q64, k64, v64, alibi_matrix(HEADS, Q_LEN, K_LEN, K_LEN - Q_LEN), allowed)
    assert_close_to(out, want, dtype)
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, ref in zip(
        _grads(out, (q, k, v), cotangent), _grads(want, (q64, k64, v64), cotangent), strict=True
    ):
        assert_close_to(got, ref, dtype, grad=True)


@pytest.mark.parametrize("mask_name", ["none", "causal", "window"])
@pytest.mark.parametrize("kernel", ["reference", "sdpa", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["written_out", "fused"])
def test_relative_bias_trains_its_table(mask_name, kernel, dtype, gen):
    """T5's bias as a score mod: the output and the table's gradient equal those of the
    dense bias that `RelativePositionBias` builds from the same table."""
    q, k, v = _inputs(dtype, gen)
    dense_module = RelativePositionBias(HEADS, num_buckets=8, max_distance=16).double()
    table = dense_module.embedding.weight.detach().clone().to(dtype).requires_grad_()
    mod = score_mods.relative_bias(table, max_distance=16, q_len=Q_LEN, k_len=K_LEN)
    mask = MASKS[mask_name]()
    out = multihead.attention(q, k, v, mask=mask, score_mod=mod, kernel=kernel)
    allowed = None if mask is None else mask.to_dense()
    want = oracle(q.detach(), k.detach(), v.detach(), dense_module(Q_LEN, K_LEN), allowed)
    assert_close_to(out, want, dtype)
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad((out.double() * cotangent).sum(), table)
    (ref,) = torch.autograd.grad(
        (oracle(q.detach(), k.detach(), v.detach(), dense_module(Q_LEN, K_LEN), allowed)
         * cotangent).sum(),
        dense_module.embedding.weight,
    )  # fmt: skip
    assert_close_to(got, ref, dtype, grad=True)


@pytest.mark.parametrize("kernel", ["reference", "tiled"])
def test_a_plain_function_and_soft_capping_compose(kernel, gen):
    """A plain FlexAttention-style function (here a per-head scale) then soft-capping."""
    q, k, v = _inputs(torch.float64, gen)
    factors = torch.tensor([1.0, 0.5, 2.0, 3.0], dtype=torch.float64)

    def per_head(score, b, h, q_idx, kv_idx):
        return score * factors[h]

    out = multihead.attention(
        q, k, v, causal="bottom-right", score_mod=per_head, softcap=2.0, kernel=kernel
    )
    allowed = masks.causal(Q_LEN, K_LEN, align="bottom-right").to_dense()
    q64 = q.detach() * factors.view(1, -1, 1, 1)  # scaling the query scales the score
    want = oracle(q64, k.detach(), v.detach(), None, allowed, cap=2.0)
    assert_close_to(out, want, torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: multihead.attention(
            q, k, v, causal="bottom-right", score_mod=per_head, softcap=2.0, kernel=kernel
        ),
        (q, k, v),
    )


def test_sdpa_declines_a_score_mod_that_is_not_a_bias(gen):
    q, k, v = _inputs(torch.float32, gen)
    with pytest.raises(ValueError, match="sdpa.*score mod"):
        multihead.attention(q, k, v, score_mod=lambda s, b, h, i, j: s * 2, kernel="sdpa")
    line = multihead.explain(q, k, v, score_mod=lambda s, b, h, i, j: s * 2)
    assert line.startswith("reference:") and "sdpa skipped" in line


def test_alibi_builds_no_score_sized_tensor(monkeypatch):
    """On a causal mask the tiled kernel asks ALiBi for a row part and a key part per span,
    and for a full bias only on the cut diagonal tiles: nothing near N² is built."""
    n, heads = 1024, 2
    largest = []
    mod = score_mods.alibi(heads)
    original_bias, original_parts = mod.bias, mod.bias_parts

    def bias(h, q, k):
        out = original_bias(h, q, k)
        largest.append(out.numel())
        return out

    def parts(h, q, k, bounds):
        out = original_parts(h, q, k, bounds)
        if out is not None:
            largest.append(out[0].numel() + out[1].numel())
        return out

    monkeypatch.setattr(mod, "bias", bias)
    monkeypatch.setattr(mod, "bias_parts", parts)
    monkeypatch.setattr(online_softmax, "BLOCK_Q", 64)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 64)
    q = torch.randn(1, heads, n, 16, requires_grad=True)
    out = multihead.attention(q, q, q, causal=True, score_mod=mod, kernel="tiled")
    out.sum().backward()
    assert largest and max(largest) <= heads * 64 * n  # one row block's keys, not n × n
    want = oracle(q.detach(), q.detach(), q.detach(), alibi_matrix(heads, n, n),
                  masks.causal(n).to_dense())  # fmt: skip
    assert_close_to(out, want, torch.float32)


def test_auto_takes_the_tiled_kernel_when_the_bias_would_be_large(monkeypatch):
    from multihead.kernels import tiled

    monkeypatch.setattr(tiled, "SCORE_MATRIX_BUDGET", 1000)
    q = torch.zeros(1, 2, 32, 4)
    line = multihead.explain(q, q, q, causal=True, score_mod=score_mods.alibi(2))
    assert line.startswith("tiled:") and "score mod" in line


def test_bad_score_mods_are_refused(gen):
    q, k, v = _inputs(torch.float32, gen)
    with pytest.raises(TypeError, match="score_mod must be callable"):
        multihead.attention(q, k, v, score_mod=3)
    with pytest.raises(ValueError, match="table must be"):
        score_mods.relative_bias(torch.zeros(3))
    with pytest.raises(ValueError, match="softcap must be a positive"):
        score_mods.softcap(-1.0)
