"""Kernels against the float64 reference, and the reference against the written-out formula.

The grid: every kernel × dtype × head layout (MHA, GQA 4/2, MQA 4/1) × mask kind, forward
and backward. Masks are passed to the library as `Mask`s / tensors / ``causal=``, and built
independently by hand (arange comparisons) for the naive oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    DTYPES,
    KERNEL_NAMES,
    assert_close_to,
    make_qkv,
    naive_attention,
    randn,
    reference64,
    to64,
)
from torch import Tensor

from multihead import attention, masks

BATCH, HEADS, HEAD_DIM, VALUE_DIM = 2, 4, 8, 6
HEAD_LAYOUTS = {"mha": 4, "gqa4/2": 2, "mqa4/1": 1}


@dataclass
class Case:
    q_len: int
    k_len: int
    kwargs: dict
    allowed: Tensor | None = None  # bool, broadcastable to (B, H, Q, K), built by hand
    bias: Tensor | None = None  # float additive bias, broadcastable to (B, H, Q, K)


def positions(q_len: int, k_len: int) -> tuple[Tensor, Tensor]:
    return torch.arange(q_len).view(-1, 1), torch.arange(k_len).view(1, -1)


def causal_by_hand(q_len: int, k_len: int, bottom_right: bool = False) -> Tensor:
    i, j = positions(q_len, k_len)
    return j <= i + (k_len - q_len if bottom_right else 0)


def padding_by_hand(lengths: list[int], q_len: int, k_len: int) -> Tensor:
    _, j = positions(q_len, k_len)
    return torch.stack([(j < n).expand(q_len, k_len) for n in lengths]).unsqueeze(1)


def documents_by_hand(ids: list[int]) -> Tensor:
    ids_t = torch.tensor(ids)
    return ids_t.view(-1, 1) == ids_t.view(1, -1)


def _case(name: str, gen: torch.Generator) -> Case:
    b, h = BATCH, HEADS
    if name == "none":
        return Case(5, 7, {})
    if name == "causal_top_left":
        return Case(5, 7, {"causal": True}, causal_by_hand(5, 7))
    if name == "causal_top_left_as_mask":
        return Case(5, 7, {"mask": masks.causal(5, 7)}, causal_by_hand(5, 7))
    if name == "causal_bottom_right":
        return Case(5, 7, {"causal": "bottom-right"}, causal_by_hand(5, 7, bottom_right=True))
    if name == "causal_bottom_right_tall":  # more queries than keys: first rows see nothing
        return Case(7, 4, {"causal": "bottom-right"}, causal_by_hand(7, 4, bottom_right=True))
    if name == "padding":
        mask = masks.padding([7, 4], max_len=7, q_len=5)
        return Case(5, 7, {"mask": mask}, padding_by_hand([7, 4], 5, 7))
    if name == "sliding_window":
        i, j = positions(6, 6)
        return Case(6, 6, {"mask": masks.sliding_window(6, window=3)}, (j <= i) & (j > i - 3))
    if name == "sliding_window_bottom_right":
        i, j = positions(5, 7)
        mask = masks.sliding_window(5, 7, window=2, align="bottom-right")
        return Case(5, 7, {"mask": mask}, (j <= i + 2) & (j > i))
    if name == "documents_1d":
        ids = [0, 0, 1, 1, 1, 2]
        return Case(6, 6, {"mask": masks.documents(ids)}, documents_by_hand(ids))
    if name == "documents_2d":
        ids = [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
        allowed = torch.stack([documents_by_hand(r) for r in ids]).unsqueeze(1)
        return Case(6, 6, {"mask": masks.documents(ids)}, allowed)
    if name == "padding_and_causal":
        mask = masks.padding([5, 2], max_len=5) & masks.causal(5)
        return Case(5, 5, {"mask": mask}, padding_by_hand([5, 2], 5, 5) & causal_by_hand(5, 5))
    if name == "padding_with_causal_flag":  # the Mask and causal=True are merged
        mask = masks.padding([7, 3], max_len=7, q_len=5)
        allowed = padding_by_hand([7, 3], 5, 7) & causal_by_hand(5, 7)
        return Case(5, 7, {"mask": mask, "causal": True}, allowed)
    if name == "documents_causal_or_window":
        ids = [0, 0, 0, 1, 1, 1]
        mask = (masks.documents(ids) & masks.causal(6)) | masks.sliding_window(6, window=2)
        i, j = positions(6, 6)
        allowed = (documents_by_hand(ids) & (j <= i)) | ((j <= i) & (j > i - 2))
        return Case(6, 6, {"mask": mask}, allowed)
    if name == "bool_tensor_2d":
        allowed = torch.rand(5, 7, generator=gen) < 0.7
        return Case(5, 7, {"mask": allowed}, allowed)
    if name == "bool_tensor_4d_batch":
        allowed = torch.rand(b, 1, 5, 7, generator=gen) < 0.7
        return Case(5, 7, {"mask": allowed}, allowed)
    if name == "bool_per_head":
        allowed = torch.rand(1, h, 5, 7, generator=gen) < 0.6
        return Case(5, 7, {"mask": allowed}, allowed)
    if name == "bool_per_head_and_batch":
        allowed = torch.rand(b, h, 5, 7, generator=gen) < 0.6
        return Case(5, 7, {"mask": allowed}, allowed)
    if name == "float_bias_2d":
        bias = randn(5, 7, generator=gen)
        return Case(5, 7, {"mask": bias}, bias=bias)
    if name == "float_bias_per_head":
        bias = randn(b, h, 5, 7, generator=gen)
        return Case(5, 7, {"mask": bias}, bias=bias)
    if name == "float_bias_with_neg_inf":
        bias = randn(b, 1, 5, 7, generator=gen)
        bias[0, 0, 1, :] = -math.inf  # a fully masked row
        bias[1, 0, :, 2] = -math.inf  # a masked key
        return Case(5, 7, {"mask": bias}, bias=bias)
    if name == "float_bias_with_causal_bottom_right":
        bias = randn(b, 1, 5, 7, generator=gen)
        allowed = causal_by_hand(5, 7, bottom_right=True)
        return Case(5, 7, {"mask": bias, "causal": "bottom-right"}, allowed, bias)
    raise KeyError(name)


CASE_NAMES = [
    "none",
    "causal_top_left",
    "causal_top_left_as_mask",
    "causal_bottom_right",
    "causal_bottom_right_tall",
    "padding",
    "sliding_window",
    "sliding_window_bottom_right",
    "documents_1d",
    "documents_2d",
    "padding_and_causal",
    "padding_with_causal_flag",
    "documents_causal_or_window",
    "bool_tensor_2d",
    "bool_tensor_4d_batch",
    "bool_per_head",
    "bool_per_head_and_batch",
    "float_bias_2d",
    "float_bias_per_head",
    "float_bias_with_neg_inf",
    "float_bias_with_causal_bottom_right",
]


def _inputs(case: Case, kv_heads: int, dtype: torch.dtype, gen: torch.Generator):
    q, k, v = make_qkv(
        batch=BATCH,
        heads=HEADS,
        kv_heads=kv_heads,
        q_len=case.q_len,
        k_len=case.k_len,
        head_dim=HEAD_DIM,
        value_dim=VALUE_DIM,
        dtype=dtype,
        generator=gen,
    )
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _grads(output: Tensor, cotangent: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return torch.autograd.grad((output.to(cotangent.dtype) * cotangent).sum(), inputs)


# -- the oracle itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_reference_float64_matches_written_out_formula(case_name, layout, gen):
    case = _case(case_name, gen)
    q, k, v = _inputs(case, HEAD_LAYOUTS[layout], torch.float64, gen)
    bias = None if case.bias is None else case.bias.double()
    out, weights = attention(q, k, v, kernel="reference", return_weights=True, **case.kwargs)
    expected_out, expected_weights = naive_attention(q, k, v, case.allowed, bias)
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weights, expected_weights, atol=1e-12, rtol=1e-10)

    cotangent = randn(*out.shape, generator=gen, dtype=torch.float64)
    got = _grads(out, cotangent, (q, k, v))
    expected = _grads(expected_out, cotangent, (q, k, v))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


# -- every kernel against the oracle -------------------------------------------------------------
@pytest.mark.parametrize("case_name", CASE_NAMES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_kernel_matches_float64_reference(kernel, dtype, layout, case_name, gen):
    case = _case(case_name, gen)
    q, k, v = _inputs(case, HEAD_LAYOUTS[layout], dtype, gen)
    out = attention(q, k, v, kernel=kernel, **case.kwargs)
    assert out.dtype == dtype
    assert out.shape == (BATCH, HEADS, case.q_len, VALUE_DIM)

    q64, k64, v64 = to64(q), to64(k), to64(v)
    expected = reference64(q64, k64, v64, **case.kwargs)
    assert_close_to(out, expected, dtype)

    cotangent = randn(*out.shape, generator=gen, dtype=torch.float64)
    got = _grads(out, cotangent, (q, k, v))
    want = _grads(expected, cotangent, (q64, k64, v64))
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        assert_close_to(g, w, dtype, grad=True)


# -- gradcheck in float64 ------------------------------------------------------------------------
GRADCHECK_CASES = [  # (id, heads, kv_heads, kwargs)
    ("mha", 2, 2, {}),
    ("gqa4/2-padding", 4, 2, {"mask": masks.padding([4, 2], max_len=4, q_len=3)}),
    ("gqa2/1-causal-bottom-right", 2, 1, {"causal": "bottom-right"}),
    ("gqa2/1-bool-with-empty-row", 2, 1,
     {"mask": torch.tensor([[0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 0, 1]]).bool()}),
    ("softcap", 2, 2, {"softcap": 0.7}),
    ("gqa4/2-softcap-causal", 4, 2, {"softcap": 2.0, "causal": True}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kernel", "heads", "kv_heads", "kwargs"),
    [
        pytest.param(kernel, heads, kv_heads, kwargs, id=f"{kernel}-{name}")
        for kernel in KERNEL_NAMES
        for name, heads, kv_heads, kwargs in GRADCHECK_CASES
        if not (kernel == "sdpa" and "softcap" in kwargs)  # sdpa has no softcap
    ],
)
def test_gradcheck_float64(kernel, heads, kv_heads, kwargs, gen):
    q, k, v = make_qkv(
        batch=2,
        heads=heads,
        kv_heads=kv_heads,
        q_len=3,
        k_len=4,
        head_dim=3,
        dtype=torch.float64,
        generator=gen,
    )
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, kernel=kernel, **kwargs), inputs
    )


def test_gradcheck_reference_through_float_bias(gen):
    q, k, v = make_qkv(
        batch=1, heads=2, q_len=3, k_len=4, head_dim=3, dtype=torch.float64, generator=gen
    )
    bias = randn(1, 2, 3, 4, generator=gen, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention(q, k, v, mask=b, softcap=1.5, kernel="reference"), inputs
    )


# -- fully masked rows ---------------------------------------------------------------------------
def _fully_masked(how: str, gen: torch.Generator) -> tuple[dict, Tensor]:
    """Arguments that mask some rows completely, and a (B, 1, Q, 1) bool of those rows."""
    empty = torch.zeros(BATCH, 1, 5, 1, dtype=torch.bool)
    if how == "bool":
        allowed = torch.rand(BATCH, 1, 5, 7, generator=gen) < 0.7
        allowed[0, 0, 1] = False
        allowed[1, 0, 4] = False
        empty[0, 0, 1] = empty[1, 0, 4] = True
        return {"mask": allowed}, empty
    if how == "float":
        bias = randn(BATCH, 1, 5, 7, generator=gen)
        bias[1, 0, 0] = -math.inf
        empty[1, 0, 0] = True
        return {"mask": bias}, empty
    if how == "padding_length_0":
        empty[1] = True
        return {"mask": masks.padding([3, 0], max_len=7, q_len=5)}, empty
    if how == "bottom_right_tall":  # 5 queries, 3 keys: queries 0 and 1 see nothing
        empty[:, :, :2] = True
        return {"causal": "bottom-right", "k_len": 3}, empty
    if how == "everything":
        empty[:] = True
        return {"mask": torch.zeros(5, 7, dtype=torch.bool)}, empty
    raise KeyError(how)


@pytest.mark.parametrize("no_grad", [False, True], ids=["train", "inference"])
@pytest.mark.parametrize(
    "how", ["bool", "float", "padding_length_0", "bottom_right_tall", "everything"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_fully_masked_rows_give_zeros_and_finite_grads(kernel, dtype, how, no_grad, gen):
    kwargs, empty = _fully_masked(how, gen)
    k_len = kwargs.pop("k_len", 7)
    q, k, v = make_qkv(
        batch=BATCH, heads=HEADS, kv_heads=2, q_len=5, k_len=k_len, dtype=dtype, generator=gen
    )
    if no_grad:
        with torch.no_grad():
            out = attention(q, k, v, kernel=kernel, **kwargs)
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = attention(q, k, v, kernel=kernel, **kwargs)
    assert torch.isfinite(out).all()
    assert (out.masked_select(empty) == 0).all()  # rows with no visible key are exactly 0
    assert (out.masked_select(~empty) != 0).any() or bool(empty.all())
    assert_close_to(out, reference64(q, k, v, **kwargs), dtype)
    if no_grad:
        return
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert (grads[0].masked_select(empty) == 0).all()  # nothing flows into an empty row
    if empty.all():
        assert (grads[1] == 0).all() and (grads[2] == 0).all()
    if kernel == "reference":
        _, weights = attention(q, k, v, kernel=kernel, return_weights=True, **kwargs)
        assert (weights.masked_select(empty) == 0).all()
        rows = weights.sum(-1, keepdim=True)
        torch.testing.assert_close(rows, (~empty).to(rows.dtype).expand_as(rows))


# -- softcap -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_softcap_matches_hand_formula(dtype, kv_heads, gen):
    cap = 0.8
    q, k, v = make_qkv(heads=4, kv_heads=kv_heads, dtype=dtype, generator=gen)
    q = q * 4  # large logits, so the cap matters
    allowed = causal_by_hand(5, 7)
    out, weights = attention(q, k, v, softcap=cap, causal=True, return_weights=True)

    group = 4 // kv_heads
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    capped = cap * torch.tanh(scores / cap)
    expected_w = torch.softmax(capped.masked_fill(~allowed, -math.inf), dim=-1)
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}
    torch.testing.assert_close(weights.to(dtype), expected_w, **tol)
    torch.testing.assert_close(out, expected_w @ values, **tol)
    # The cap bounds every logit to (-cap, cap): in a row, visible weights differ by at most
    # a factor e^(2·cap).
    row_max = weights.amax(-1)
    row_min = weights.masked_fill(~allowed, math.inf).amin(-1)
    assert (row_max / row_min <= math.exp(2 * cap) * (1 + 1e-5)).all()
    # ...which the same inputs without the cap exceed.
    _, plain = attention(q, k, v, causal=True, return_weights=True)
    plain_ratio = plain.amax(-1) / plain.masked_fill(~allowed, math.inf).amin(-1)
    assert (plain_ratio > math.exp(2 * cap)).any()


def test_softcap_is_rejected_by_sdpa(gen):
    q, k, v = make_qkv(generator=gen)
    with pytest.raises(ValueError, match="sdpa.*soft-capping"):
        attention(q, k, v, softcap=1.0, kernel="sdpa")


# -- dropout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_dropout_is_reproducible_under_manual_seed(kernel, gen):
    q, k, v = make_qkv(generator=gen)
    torch.manual_seed(7)
    first = attention(q, k, v, dropout_p=0.3, kernel=kernel)
    torch.manual_seed(7)
    again = attention(q, k, v, dropout_p=0.3, kernel=kernel)
    torch.manual_seed(8)
    other_seed = attention(q, k, v, dropout_p=0.3, kernel=kernel)
    no_dropout = attention(q, k, v, dropout_p=0.0, kernel=kernel)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert not torch.allclose(first, no_dropout)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_dropout_zeroes_or_rescales_each_weight(kernel, gen):
    # With value = identity, the output rows *are* the (dropped-out) attention weights.
    p = 0.5
    q, k, _ = make_qkv(q_len=6, k_len=6, generator=gen)
    v = torch.eye(6).expand(2, 4, 6, 6)
    _, weights = attention(q, k, v, causal=True, return_weights=True)
    torch.manual_seed(0)
    out = attention(q, k, v, causal=True, dropout_p=p, kernel=kernel)
    kept = out != 0
    assert kept.any() and (~kept & (weights > 0)).any()  # some dropped, some kept
    torch.testing.assert_close(out[kept], weights[kept] / (1 - p))
    assert (out[weights == 0] == 0).all()  # masked keys stay masked


def test_dropout_reference_returns_weights_that_still_sum_to_one(gen):
    q, k, v = make_qkv(generator=gen)
    torch.manual_seed(3)
    out, weights = attention(q, k, v, dropout_p=0.4, return_weights=True, causal=True)
    _, clean_weights = attention(q, k, v, return_weights=True, causal=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    torch.testing.assert_close(weights, clean_weights)  # weights are reported before dropout
    assert not torch.allclose(out, clean_weights @ v)


# -- returned weights ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case_name",
    ["none", "causal_bottom_right", "padding", "bool_per_head", "float_bias_with_neg_inf"],
)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_weights_are_the_softmax_and_produce_the_output(dtype, layout, case_name, gen):
    case = _case(case_name, gen)
    kv_heads = HEAD_LAYOUTS[layout]
    q, k, v = _inputs(case, kv_heads, dtype, gen)
    out, weights = attention(q, k, v, return_weights=True, **case.kwargs)
    assert weights.shape == (BATCH, HEADS, case.q_len, case.k_len)

    # Softmax by hand, in float64, from the (rounded) inputs.
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    keys = k64.repeat_interleave(HEADS // kv_heads, 1)
    values = v64.repeat_interleave(HEADS // kv_heads, 1)
    scores = q64 @ keys.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    if case.bias is not None:
        scores = scores + case.bias.double()
    if case.allowed is not None:
        scores = scores.masked_fill(~case.allowed, -math.inf)
    visible = scores != -math.inf
    expected = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    assert_close_to(weights, expected, dtype)

    # Weights are 0 on hidden keys and sum to 1 over the visible ones (0 for empty rows).
    assert (weights.masked_select(~visible) == 0).all()
    row_has_keys = visible.any(-1).to(torch.float64)
    assert_close_to(weights.sum(-1), row_has_keys, torch.float32)
    # The output is the weighted sum of the values.
    assert_close_to(out, weights.double() @ values, dtype)


def test_custom_scale(gen):
    q, k, v = make_qkv(kv_heads=2, dtype=torch.float64, generator=gen)
    expected, _ = naive_attention(q, k, v, scale=0.3)
    for kernel in KERNEL_NAMES:
        got = attention(q, k, v, scale=0.3, kernel=kernel)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_opens_empty_rows_where_the_fused_kernel_does_not_zero_them(monkeypatch, kind, gen):
    """Off the CPU (CUDA in fp16/bf16) SDPA's own result for a row that sees no key is not 0
    and its d_query NaN: such rows run over every key and are then set to 0. The same path,
    forced here on the CPU, equals the float64 reference, output and gradients."""
    from multihead.kernels import sdpa

    monkeypatch.setattr(sdpa, "ZEROES_EMPTY_ROWS", set())
    q, k, v = (t.requires_grad_() for t in make_qkv(generator=gen))
    allowed = torch.rand(2, 1, 5, 7, generator=gen) < 0.6
    allowed[0, 0, 2] = False  # an empty row
    mask = (
        allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -math.inf)
    )
    out = attention(q, k, v, mask=mask, kernel="sdpa")
    assert (out[0, :, 2] == 0).all()
    assert_close_to(out, reference64(q, k, v, mask=mask), torch.float32)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (to64(t).requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(
        reference64(q64, k64, v64, mask=mask).square().sum(), (q64, k64, v64)
    )
    for g, w in zip(got, want, strict=True):
        assert_close_to(g, w, torch.float32, grad=True)
