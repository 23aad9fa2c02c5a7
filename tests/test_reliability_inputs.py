"""Bad input at every public entry point: a ValueError/TypeError naming the argument.

Each property test draws a valid call (which must run), breaks one thing about it, and
checks the error: its type is ValueError or TypeError (never torch's RuntimeError/IndexError
from deep inside a kernel) and its message names what was wrong. The "other device" is
``meta``, the one second device every CPU build has. Empty sequences and non-finite values
have documented results, tested here too. `attention`'s own corruptions (ranks, heads, masks,
scale, dropout, softcap, kernel) are in test_functional.py; these add the rest.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from multihead import (
    CrossAttentionCache,
    KVCache,
    MultiHeadAttention,
    SlidingWindowKVCache,
    attention,
    attention_varlen,
    cli,
    compat,
    explain,
    masks,
)
from multihead.models import (
    LMConfig,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    SpeechEncoder,
    SpeechEncoderConfig,
    TransformerLM,
    ViT,
    ViTConfig,
)

USER_ERRORS = (ValueError, TypeError)
KERNELS = ["sdpa", "reference", "tiled"]


def raises_naming(call, *words: str) -> None:
    """``call()`` raises ValueError/TypeError whose message contains every word."""
    with pytest.raises(USER_ERRORS) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# -- attention: what test_functional.py does not cover -------------------------------------------

shapes = st.tuples(
    st.integers(1, 2),  # batch
    st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),  # (heads, kv_heads)
    st.integers(1, 5),  # q_len
    st.integers(1, 6),  # k_len
    st.integers(1, 4),  # head_dim
)


def qkv(shape, dtype=torch.float32, seed=0):
    batch, (heads, kv_heads), q_len, k_len, dim = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(dtype)
    return q, k, v


@given(shape=shapes, which=st.sampled_from(["query", "key", "value", "mask"]))
def test_attention_refuses_mixed_devices(shape, which):
    q, k, v = qkv(shape)
    call = {"query": q, "key": k, "value": v, "mask": torch.ones(q.shape[2], k.shape[2]) > 0}
    call[which] = call[which].to("meta")
    if which == "query":  # then the others are the odd ones out
        raises_naming(lambda: attention(**call), "on meta", "query")
    else:
        raises_naming(lambda: attention(**call), which, "on meta")


@given(shape=shapes, dtype=st.sampled_from([torch.int64, torch.int32, torch.bool]))
def test_attention_refuses_integer_and_bool_tensors(shape, dtype):
    q, k, v = qkv(shape)
    raises_naming(lambda: attention(q.to(dtype), k, v), "query", "floating-point")
    raises_naming(lambda: attention(q, k, v.to(dtype)), "value", "floating-point")


@given(shape=shapes)
def test_attention_refuses_mixed_float_dtypes(shape):
    q, k, v = qkv(shape)
    raises_naming(lambda: attention(q, k.double(), v), "key", "float64", "float32")
    raises_naming(lambda: attention(q, k, v.bfloat16()), "value", "bfloat16")


@given(shape=shapes, kernel=st.sampled_from(KERNELS))
def test_head_dim_zero_is_refused(shape, kernel):
    q, k, v = qkv(shape)
    raises_naming(
        lambda: attention(q[..., :0], k[..., :0], v, kernel=kernel), "head_dim 0", "query"
    )


@given(shape=shapes, kernel=st.sampled_from(KERNELS), empty=st.sampled_from(["q", "k", "b"]))
def test_empty_sequences_have_documented_results(shape, kernel, empty):
    """No queries → an empty output; no keys → zeros (every row fully masked); batch 0 →
    empty. Same in every kernel, with and without causal."""
    q, k, v = qkv(shape)
    if empty == "q":
        q = q[:, :, :0]
    elif empty == "k":
        k, v = k[:, :, :0], v[:, :, :0]
    else:
        q, k, v = q[:0], k[:0], v[:0]
    for causal in (False, "bottom-right"):
        out = attention(q, k, v, kernel=kernel, causal=causal)
        assert out.shape == (*q.shape[:3], v.shape[-1])
        assert (out == 0).all()
        assert "\n" not in explain(q, k, v, kernel=kernel, causal=causal)


@given(
    shape=shapes,
    which=st.sampled_from(["query", "key", "value", "mask"]),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    data=st.data(),
)
def test_check_finite_names_the_argument(shape, which, bad, data):
    q, k, v = qkv(shape)
    call = {"query": q, "key": k, "value": v, "mask": torch.zeros(q.shape[2], k.shape[2])}
    tensor = call[which].clone()
    index = tuple(data.draw(st.integers(0, n - 1)) for n in tensor.shape)
    tensor[index] = bad
    call[which] = tensor
    if which == "mask" and bad == -math.inf:  # -inf in a float mask means "blocked": fine
        attention(**call, check_finite=True)
        return
    with pytest.raises(ValueError, match=f"{which} has 1 values? that (are|is) NaN") as info:
        attention(**call, check_finite=True)
    where = (0, 0, *index) if which == "mask" else index  # a 2-D mask is seen as 4-D
    assert str(where) in str(info.value)
    attention(**call)  # without the option the call runs (the next test says what it gives)


@settings(max_examples=20)
@given(
    shape=shapes,
    kernel=st.sampled_from(KERNELS),
    which=st.sampled_from(["query", "key", "value"]),
    bad=st.sampled_from([math.nan, math.inf]),
    data=st.data(),
)
def test_non_finite_input_is_never_hidden(shape, kernel, which, bad, data):
    """Without a mask, every kernel gives NaN exactly where the float64 reference does: a bad
    query row poisons its output row, a bad key every row, a bad value its column. (torch's
    fused kernels alone would turn an all-NaN score row into zeros.) An inf key is drawn
    beside a finite one: a query's only key at score -inf looks like a masked one to the
    fused kernels (0) but not to the reference (NaN)."""
    if which == "key" and bad == math.inf and shape[3] == 1:
        shape = (*shape[:3], 2, shape[4])
    q, k, v = qkv(shape)
    call = {"query": q, "key": k, "value": v}
    tensor = call[which].clone()
    index = tuple(data.draw(st.integers(0, n - 1)) for n in tensor.shape)
    tensor[index] = bad
    call[which] = tensor
    out = attention(**call, kernel=kernel)
    reference = attention(**{n: t.double() for n, t in call.items()}, kernel="reference")
    assert torch.equal(out.isnan(), reference.isnan())
    assert torch.equal(out.isfinite(), reference.isfinite())
    if bad != bad:  # NaN always shows (an inf key may just look like a masked one)
        assert out.isnan().any()
    finite = reference.isfinite()
    torch.testing.assert_close(out[finite].double(), reference[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_single_nan_key(kernel):
    """A query whose only key is NaN gets NaN, never the 0 of a fully masked row (torch's
    fused kernels alone return 0 for an all-NaN score row); check_finite refuses it."""
    q, k, v = qkv((1, (1, 1), 2, 1, 2))
    k[0, 0, 0, 0] = math.nan
    out = attention(q, k, v, kernel=kernel)
    assert out.isnan().all()
    raises_naming(lambda: attention(q, k, v, check_finite=True), "key", "NaN")


MASK_KINDS = ["none", "causal", "bottom-right", "window", "bool", "float"]


def _masked_call(how: str, shape, seed: int) -> tuple[dict, Tensor]:
    """Keyword arguments of a masked call and, derived by hand, which keys each query sees
    (batch|1, heads|1, q_len, k_len): a float mask is added, so NaN + bias stays NaN and
    every key counts as seen; a bool/causal/structured mask hides what it masks out."""
    batch, (heads, _), q_len, k_len, _ = shape
    i = torch.arange(q_len).view(-1, 1)
    j = torch.arange(k_len).view(1, -1)
    g = torch.Generator().manual_seed(seed)
    # A random mask per batch element or head (rows may be fully masked).
    drawn = torch.rand(batch, heads, q_len, k_len, generator=g) < 0.6
    drawn = drawn[:, :1] if seed % 2 else drawn[:1]
    everything = torch.ones(1, 1, q_len, k_len, dtype=torch.bool)
    if how == "none":
        return {}, everything
    if how == "causal":
        return {"causal": True}, (j <= i).view(1, 1, q_len, k_len)
    if how == "bottom-right":
        return {"causal": "bottom-right"}, (j <= i + k_len - q_len).view(1, 1, q_len, k_len)
    if how == "window":
        seen = (j <= i) & (j > i - 2)
        return {"mask": masks.sliding_window(q_len, k_len, window=2)}, seen.view(1, 1, *seen.shape)
    if how == "bool":
        return {"mask": drawn}, drawn
    bias = torch.zeros(drawn.shape).masked_fill(~drawn, -math.inf)
    return {"mask": bias}, everything


@settings(max_examples=60)
@given(
    shape=shapes,
    kernel=st.sampled_from(["sdpa", "tiled"]),
    which=st.sampled_from(["query", "key", "value"]),
    how=st.sampled_from(MASK_KINDS),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_nan_under_a_mask_shows_where_the_reference_has_it(shape, kernel, which, how, seed, data):
    """A NaN query row makes its output row NaN; a NaN key makes NaN exactly the rows that
    see it (a masked-out NaN key changes nothing, a visible one is never a clean 0), as the
    float64 reference gives them, and as derived here from the mask. A NaN value reaches at
    least the rows that see it, and at most the reference's rows (whose zero weights times
    NaN make its whole column NaN)."""
    q, k, v = qkv(shape, seed=seed)
    kwargs, seen = _masked_call(how, shape, seed)
    call = {"query": q, "key": k, "value": v}
    tensor = call[which].clone()
    index = tuple(data.draw(st.integers(0, n - 1)) for n in tensor.shape)
    tensor[index] = math.nan
    call[which] = tensor
    out = attention(**call, **kwargs, kernel=kernel)
    double = {n: t.double() for n, t in call.items()}
    if isinstance(kwargs.get("mask"), Tensor) and kwargs["mask"].dtype.is_floating_point:
        kwargs = {"mask": kwargs["mask"].double()}
    reference = attention(**double, **kwargs, kernel="reference")

    batch, (heads, kv_heads), q_len, _, dim = shape
    b, h, position, feature = index
    expected = torch.zeros(batch, heads, q_len, dim, dtype=torch.bool)
    group = slice(h * (heads // kv_heads), (h + 1) * (heads // kv_heads))  # query heads of h
    if which == "query":
        expected[b, h, position] = True
    elif which == "key":
        rows = seen.expand(batch, heads, -1, -1)[b, group, :, position]
        expected[b, group] = rows.unsqueeze(-1).expand(-1, -1, dim)
    else:
        expected[b, group, :, feature] = seen.expand(batch, heads, -1, -1)[b, group, :, position]
    if which == "value":
        assert torch.equal(out.isnan() & expected, expected)
        assert torch.equal(out.isnan() & reference.isnan(), out.isnan())
    else:
        assert torch.equal(reference.isnan(), expected)
        assert torch.equal(out.isnan(), expected)
    finite = out.isfinite() & reference.isfinite()  # a value's NaN may stop short of a row
    torch.testing.assert_close(out[finite].double(), reference[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", MASK_KINDS)
@pytest.mark.parametrize("kernel", ["sdpa", "tiled"])
def test_nan_rows_leave_the_other_gradients_as_without_them(kernel, how):
    """With a NaN query row and a NaN key, the loss over the rows that stay finite has the
    gradients of the float64 reference on the same inputs with the NaN rows set to 0 (those
    rows of the loss see neither): finite, and nothing flows into the NaN rows."""
    shape = (2, (4, 2), 5, 6, 3)
    q, k, v = qkv(shape, seed=1)
    kwargs, _ = _masked_call(how, shape, seed=3)
    q[1, 2, 3, 0] = math.nan
    k[0, 1, 2, 1] = math.nan
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, **kwargs, kernel=kernel)
    fine = out.isfinite().all(-1, keepdim=True)
    assert not fine.all()
    grads = torch.autograd.grad(out.masked_fill(~fine, 0).square().sum(), inputs)

    zeroed = [t.nan_to_num(0.0).double().requires_grad_() for t in (q, k, v)]
    if isinstance(kwargs.get("mask"), Tensor) and kwargs["mask"].dtype.is_floating_point:
        kwargs = {"mask": kwargs["mask"].double()}
    expected_out = attention(*zeroed, **kwargs, kernel="reference")
    expected = torch.autograd.grad(expected_out.masked_fill(~fine, 0).square().sum(), zeroed)
    for grad, want in zip(grads, expected, strict=True):
        assert grad.isfinite().all()
        torch.testing.assert_close(grad.double(), want, atol=1e-5, rtol=1e-5)
    assert (grads[0][1, 2, 3] == 0).all() and (grads[1][0, 1, 2] == 0).all()


def test_check_finite_must_be_a_bool():
    q, k, v = qkv((1, (1, 1), 2, 2, 2))
    raises_naming(lambda: attention(q, k, v, check_finite="yes"), "check_finite")


# -- attention_varlen: cu_seqlens ----------------------------------------------------------------


def _packed(lengths_q, lengths_k, heads=2, dim=4):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    k = torch.randn(sum(lengths_k), heads, dim, generator=g)
    v = torch.randn(sum(lengths_k), heads, dim, generator=g)

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    return q, k, v, cu(lengths_q), cu(lengths_k)


lengths = st.lists(st.integers(0, 4), min_size=1, max_size=4)


@given(lq=lengths, data=st.data())
def test_varlen_refuses_bad_cu_seqlens(lq, data):
    lk = data.draw(st.lists(st.integers(0, 4), min_size=len(lq), max_size=len(lq)))
    q, k, v, cu_q, cu_k = _packed(lq, lk)
    attention_varlen(q, k, v, cu_q, cu_k)  # the valid call runs
    how = data.draw(
        st.sampled_from(["decreasing", "wrong_total", "not_from_0", "float", "2d", "batch", "list"])
    )
    name = data.draw(st.sampled_from(["cu_seqlens_q", "cu_seqlens_k"]))
    cu = (cu_q if name == "cu_seqlens_q" else cu_k).clone()
    if how == "decreasing":
        if len(cu) < 3 or cu[-1] == 0:
            cu = torch.tensor([0, 1, 0], dtype=torch.int32)
        else:
            first, second = int(cu[1]), int(cu[2])
            cu[1], cu[2] = second + 1, first
        words = [name]
    elif how == "wrong_total":
        cu[-1] += data.draw(st.sampled_from([-1, 1])) if cu[-1] > 0 else 1
        words = [name]
    elif how == "not_from_0":
        cu = cu + 1
        words = [name, "start at 0"]
    elif how == "float":
        cu = cu.float()
        words = [name, "integer"]
    elif how == "2d":
        cu = cu.unsqueeze(0)
        words = [name, "1-D"]
    elif how == "batch":
        cu = torch.cat([cu, cu[-1:]])
        words = ["sequences"]
    else:
        cu = cu.tolist()
        words = [name, "torch.Tensor"]
    args = [q, k, v, cu_q, cu_k]
    args[3 if name == "cu_seqlens_q" else 4] = cu
    raises_naming(lambda: attention_varlen(*args), *words)


def test_varlen_refuses_bad_packed_tensors():
    q, k, v, cu_q, cu_k = _packed([2, 3], [3, 1])
    raises_naming(lambda: attention_varlen(q[None], k, v, cu_q, cu_k), "query", "3-D")
    raises_naming(lambda: attention_varlen(q, k.double(), v, cu_q, cu_k), "key", "float64")
    raises_naming(lambda: attention_varlen(q, k, v.long(), cu_q, cu_k), "value")
    raises_naming(lambda: attention_varlen(q, k, "v", cu_q, cu_k), "value", "torch.Tensor")


# -- MultiHeadAttention --------------------------------------------------------------------------

layers = st.tuples(
    st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),  # (heads, kv_heads)
    st.integers(1, 3),  # head_dim
    st.integers(1, 2),  # batch
    st.integers(1, 4),  # seq
)

MHA_CORRUPTIONS = {
    "not_tensor": (lambda x: x.tolist(), ["query", "torch.Tensor"]),
    "integer": (lambda x: x.long(), ["query", "floating-point"]),
    "float64": (lambda x: x.double(), ["query", "float64", "float32"]),
    "bfloat16": (lambda x: x.bfloat16(), ["query", "bfloat16"]),
    "meta": (lambda x: x.to("meta"), ["query", "meta"]),
    "rank2": (lambda x: x[0], ["query", "3-D"]),
    "rank4": (lambda x: x[None], ["query", "3-D"]),
    "features": (lambda x: torch.cat([x, x[..., :1]], -1), ["query", "features"]),
}


@given(layer=layers, how=st.sampled_from(sorted(MHA_CORRUPTIONS)))
def test_multi_head_attention_refuses_bad_query(layer, how):
    (heads, kv_heads), head_dim, batch, seq = layer
    module = MultiHeadAttention(heads * head_dim, heads, num_kv_heads=kv_heads)
    x = torch.randn(batch, seq, heads * head_dim)
    module(x)
    corrupt, words = MHA_CORRUPTIONS[how]
    raises_naming(lambda: module(corrupt(x)), *words)


@given(layer=layers, data=st.data())
def test_multi_head_attention_refuses_bad_key_value_and_mask(layer, data):
    (heads, kv_heads), head_dim, batch, seq = layer
    module = MultiHeadAttention(heads * head_dim, heads, num_kv_heads=kv_heads)
    x = torch.randn(batch, seq, heads * head_dim)
    memory = torch.randn(batch, seq + 1, heads * head_dim)
    module(x, memory, mask=torch.ones(seq, seq + 1, dtype=torch.bool))
    how = data.draw(st.sampled_from(["length", "batch", "key_dtype", "mask_shape", "mask_int"]))
    if how == "length":
        raises_naming(lambda: module(x, memory, memory[:, :-1]), "key", "value", "positions")
    elif how == "batch":
        raises_naming(lambda: module(x, torch.cat([memory, memory])), "batch")
    elif how == "key_dtype":
        raises_naming(lambda: module(x, memory.double()), "key", "float64")
    elif how == "mask_shape":
        raises_naming(lambda: module(x, memory, mask=torch.ones(seq, seq) > 0), "mask", "shape")
    else:
        raises_naming(lambda: module(x, mask=torch.ones(seq, seq, dtype=torch.long)), "mask")


@given(
    args=st.sampled_from(
        [
            ((0, 1), {}, "embed_dim"),
            ((8, 0), {}, "num_heads"),
            ((8, 3), {}, "divisible"),
            ((8.0, 2), {}, "embed_dim"),
            ((8, 2), {"num_kv_heads": 3}, "num_kv_heads"),
            ((8, 2), {"num_kv_heads": 0}, "num_kv_heads"),
            ((8, 2), {"dropout": 1.0}, "dropout"),
            ((8, 2), {"dropout": -0.1}, "dropout"),
            ((8, 2), {"softcap": -1.0}, "softcap"),
            ((8, 2), {"kdim": 0}, "kdim"),
        ]
    )
)
def test_multi_head_attention_refuses_bad_construction(args):
    positional, keywords, word = args
    raises_naming(lambda: MultiHeadAttention(*positional, **keywords), word)


# -- compat.MultiheadAttention -------------------------------------------------------------------


@given(layer=layers, batch_first=st.booleans(), data=st.data())
def test_compat_refuses_bad_input(layer, batch_first, data):
    (heads, _), head_dim, batch, seq = layer
    module = compat.MultiheadAttention(heads * head_dim, heads, batch_first=batch_first)
    x = torch.randn(batch, seq, heads * head_dim)
    if not batch_first:
        x = x.transpose(0, 1)
    module(x, x, x)
    how = data.draw(
        st.sampled_from(
            ["integer", "meta", "float64", "rank4", "kpm_shape", "kpm_int", "attn_shape", "list"]
        )
    )
    if how == "integer":
        raises_naming(lambda: module(x.long(), x.long(), x.long()), "query", "floating-point")
    elif how == "meta":
        m = x.to("meta")
        raises_naming(lambda: module(m, m, m), "query", "meta")
    elif how == "float64":
        raises_naming(lambda: module(x, x.double(), x), "key", "float64")
    elif how == "rank4":
        raises_naming(lambda: module(x[None], x[None], x[None]), "query", "2-D")
    elif how == "kpm_shape":
        kpm = torch.zeros(seq + 1, batch, dtype=torch.bool)
        raises_naming(lambda: module(x, x, x, key_padding_mask=kpm), "key_padding_mask")
    elif how == "kpm_int":
        kpm = torch.zeros(batch, seq, dtype=torch.long)
        raises_naming(lambda: module(x, x, x, key_padding_mask=kpm), "key_padding_mask")
    elif how == "attn_shape":
        attn = torch.zeros(seq + 1, seq, dtype=torch.bool)
        raises_naming(lambda: module(x, x, x, attn_mask=attn), "attn_mask")
    else:
        raises_naming(lambda: module(x.tolist(), x, x), "query", "torch.Tensor")


def test_compat_fully_masked_rows_are_a_documented_zero():
    module = compat.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8, requires_grad=True)
    padding = torch.tensor([[True, True, True], [False, True, True]])  # row 0 sees nothing
    out, weights = module(x, x, x, key_padding_mask=padding)
    assert torch.isfinite(out).all() and (weights[0] == 0).all()
    torch.testing.assert_close(out[0], module.out_proj.bias.expand(3, 8))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


# -- masks ---------------------------------------------------------------------------------------

MASK_CALLS = [
    (lambda: masks.causal(-1), "q_len"),
    (lambda: masks.causal(2.0), "q_len"),
    (lambda: masks.causal(2, -3), "k_len"),
    (lambda: masks.causal(2, align="left"), "align"),
    (lambda: masks.sliding_window(4, window=0), "window"),
    (lambda: masks.sliding_window(4, window=-2), "window"),
    (lambda: masks.sliding_window(4, window=1.5), "window"),
    (lambda: masks.padding([1.5, 2]), "lengths"),
    (lambda: masks.padding([[1, 2]]), "lengths"),
    (lambda: masks.padding([-1, 2]), "lengths"),
    (lambda: masks.padding(None), "lengths"),
    (lambda: masks.padding("ab"), "lengths"),
    (lambda: masks.padding([5], max_len=3), "max_len"),
    (lambda: masks.padding([1], max_len=3.0), "max_len"),
    (lambda: masks.padding([True, False]), "lengths"),
    (lambda: masks.documents([[[1]]]), "doc_ids"),
    (lambda: masks.documents([1.0, 2.0]), "doc_ids"),
    (lambda: masks.documents(None), "doc_ids"),
    (lambda: masks.causal(3) & torch.ones(3, 3, dtype=torch.bool), "Mask"),
    (lambda: masks.causal(3) | masks.causal(4), "sizes"),
    (lambda: masks.padding([1, 2]) & masks.padding([1, 2, 2]), "batch"),
    (lambda: masks.causal(3).block_structure(0, 2), "block"),
]


@pytest.mark.parametrize(("call", "word"), MASK_CALLS, ids=[w for _, w in MASK_CALLS])
def test_masks_refuse_bad_arguments(call, word):
    raises_naming(call, word)


@given(
    q_len=st.integers(0, 6),
    k_len=st.integers(0, 6),
    window=st.integers(1, 4),
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3),
)
def test_valid_masks_have_their_documented_shape(q_len, k_len, window, lengths):
    for mask in (
        masks.causal(q_len, k_len),
        masks.causal(q_len, k_len, align="bottom-right"),
        masks.sliding_window(q_len, k_len, window=window),
    ):
        assert mask.to_dense().shape == (1, 1, q_len, k_len)
    padded = masks.padding(lengths, max_len=max(lengths), q_len=q_len)
    dense = padded.to_dense()
    assert dense.shape == (len(lengths), 1, q_len, max(lengths))
    assert dense.sum(-1)[:, 0, :].tolist() == [[n] * q_len for n in lengths]


# -- caches --------------------------------------------------------------------------------------


@given(
    max_len=st.integers(1, 6),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=5),
)
def test_kv_cache_overflow_is_refused_and_loses_nothing(max_len, chunks):
    """Writing past the capacity raises, naming the overflow, and leaves the cache as it was."""
    cache = KVCache(1, 2, max_len, 3)
    written = 0
    for n in chunks:
        key = torch.full((1, 2, n, 3), float(written + 1))
        if written + n > max_len:
            before = (cache.keys.clone(), cache.values.clone(), cache.length)
            raises_naming(lambda key=key: cache.append(key, key), "overflow", f"max_len={max_len}")
            assert torch.equal(cache.keys, before[0]) and torch.equal(cache.values, before[1])
            assert cache.length == before[2] == written
            return
        keys, _ = cache.append(key, key)
        written += n
        assert keys.shape[2] == written == cache.length


CACHE_CALLS = [
    (lambda c: c.append(torch.ones(1, 2, 1, 3).double(), torch.ones(1, 2, 1, 3)), "float64"),
    (lambda c: c.append(torch.ones(1, 2, 1, 3).long(), torch.ones(1, 2, 1, 3)), "int64"),
    (lambda c: c.append(torch.ones(1, 2, 1, 3, device="meta"), torch.ones(1, 2, 1, 3)), "meta"),
    (lambda c: c.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4)), "shape"),
    (lambda c: c.append(torch.ones(1, 2, 1, 3), torch.ones(1, 2, 2, 3)), "positions"),
    (lambda c: c.append([1.0], torch.ones(1, 2, 1, 3)), "key"),
    (lambda c: c.reorder(torch.tensor([1])), "beam_indices"),
    (lambda c: c.reorder(torch.tensor([-1])), "beam_indices"),
    (lambda c: c.reorder(torch.tensor([0.0])), "beam_indices"),
    (lambda c: c.reorder(torch.tensor([0, 0])), "beam_indices"),
]


@pytest.mark.parametrize("kind", ["kv", "sliding"])
@pytest.mark.parametrize(("call", "word"), CACHE_CALLS, ids=[w for _, w in CACHE_CALLS])
def test_caches_refuse_bad_entries(kind, call, word):
    cache = KVCache(1, 2, 4, 3) if kind == "kv" else SlidingWindowKVCache(1, 2, 4, 3)
    raises_naming(lambda: call(cache), word)


@pytest.mark.parametrize(
    ("build", "word"),
    [
        (lambda: KVCache(0, 1, 1, 1), "batch_size"),
        (lambda: KVCache(1, 1, 0, 1), "max_len"),
        (lambda: KVCache(1, 1, 1, 1.5), "head_dim"),
        (lambda: KVCache(1, 1, 1, 1, dtype=torch.int64), "dtype"),
        (lambda: KVCache(1, 1, 1, 1, dtype="float32"), "dtype"),
        (lambda: SlidingWindowKVCache(1, 1, 0, 1), "window"),
        (lambda: SlidingWindowKVCache(1, 1, 2, 1, dtype=torch.bool), "dtype"),
    ],
)
def test_caches_refuse_bad_construction(build, word):
    raises_naming(build, word)


def test_caches_in_a_layer_refuse_misuse():
    layer = MultiHeadAttention(8, 2)
    x = torch.randn(2, 3, 8)
    raises_naming(lambda: layer(x, cache="cache"), "cache")
    raises_naming(lambda: layer(x, cache=KVCache(2, 2, 2, 4), causal=True), "overflow")
    raises_naming(lambda: layer(x, cache=KVCache(2, 2, 8, 4), causal="top-left"), "top-left")
    raises_naming(lambda: layer(x, x.clone(), cache=KVCache(2, 2, 8, 4)), "self-attention")
    raises_naming(lambda: layer(x, cache=KVCache(2, 2, 8, 4, dtype=torch.float64)), "float64")
    raises_naming(lambda: layer(x, cache=CrossAttentionCache()), "memory")
    cross = CrossAttentionCache()
    layer(x, x, cache=cross)
    raises_naming(lambda: layer(x.double(), cache=cross), "query", "float64")
    raises_naming(lambda: layer(x[:1], cache=cross), "batch size")
    raises_naming(lambda: cross.reorder(torch.tensor([0, 5])), "beam_indices")


# -- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    config = LMConfig(vocab_size=11, d_model=8, num_heads=2, num_layers=1, dim_feedforward=8)
    return TransformerLM(config).eval()


@pytest.fixture(scope="module")
def seq2seq() -> Seq2SeqTransformer:
    config = Seq2SeqConfig(
        vocab_size=11, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=8, max_len=8,
    )  # fmt: skip
    return Seq2SeqTransformer(config).eval()


def _bad_ids(ids: torch.Tensor, how: str, max_len: int) -> tuple[object, list[str]]:
    if how == "too_big":
        return ids + 11, ["ids", "vocab_size"]
    if how == "negative":
        return ids - 11, ["ids", "vocab_size"]
    if how == "float":
        return ids.float(), ["ids", "integer"]
    if how == "1d":
        return ids[0], ["ids", "2-D"]
    if how == "list":
        return ids.tolist(), ["ids", "torch.Tensor"]
    if how == "meta":
        return ids.to("meta"), ["ids", "meta"]
    return torch.zeros(ids.shape[0], max_len + 1, dtype=torch.long), ["max_len"]


ID_CORRUPTIONS = ["too_big", "negative", "float", "1d", "list", "meta", "too_long"]


@given(batch=st.integers(1, 3), seq=st.integers(1, 5), how=st.sampled_from(ID_CORRUPTIONS))
def test_language_model_refuses_bad_ids(lm, batch, seq, how):
    ids = torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(seq))
    lm(ids)
    bad, words = _bad_ids(ids, how, lm.config.max_len)
    raises_naming(lambda: lm(bad), *words)
    if how != "too_long":
        raises_naming(lambda: lm.generate(bad, max_new_tokens=1), *words)


@given(batch=st.integers(1, 3), seq=st.integers(1, 5), how=st.sampled_from(ID_CORRUPTIONS))
def test_seq2seq_refuses_bad_ids(seq2seq, batch, seq, how):
    ids = torch.randint(3, 11, (batch, seq), generator=torch.Generator().manual_seed(seq))
    seq2seq(ids, ids)
    bad, words = _bad_ids(ids, how, seq2seq.config.max_len)
    side = "tgt_in_ids" if seq % 2 else "src_ids"
    call = (lambda: seq2seq(ids, bad)) if side == "tgt_in_ids" else (lambda: seq2seq(bad, ids))
    raises_naming(call, *[w.replace("ids", side) if w == "ids" else w for w in words])


def test_empty_sequences_through_the_models(lm, seq2seq):
    assert lm(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 11)
    assert seq2seq(torch.full((1, 3), 4), torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, 11)
    raises_naming(lambda: lm.generate(torch.zeros(1, 0, dtype=torch.long)), "non-empty")


@given(how=st.sampled_from(["int", "float64", "meta", "size", "channels", "rank", "list"]))
def test_vit_refuses_bad_images(how):
    model = ViT(ViTConfig(d_model=8, num_heads=2, num_layers=1, dim_feedforward=8)).eval()
    images = torch.randn(2, 1, 8, 8)
    model(images)
    bad, words = {
        "int": (images.long(), ["images", "floating-point"]),
        "float64": (images.double(), ["images", "float64"]),
        "meta": (images.to("meta"), ["images", "meta"]),
        "size": (torch.randn(2, 1, 10, 10), ["images", "(batch, 1, 8, 8)"]),
        "channels": (torch.randn(2, 3, 8, 8), ["images"]),
        "rank": (images[0], ["images"]),
        "list": (images.tolist(), ["images", "torch.Tensor"]),
    }[how]
    raises_naming(lambda: model(bad), *words)


@given(how=st.sampled_from(["int", "float64", "mels", "lengths_long", "lengths_batch", "short"]))
def test_speech_encoder_refuses_bad_features(how):
    config = SpeechEncoderConfig(
        d_model=8, num_heads=2, num_layers=1, dim_feedforward=8, conv_channels=2
    )
    model = SpeechEncoder(config).eval()
    feats, lengths = torch.randn(2, 20, 40), torch.tensor([20, 12])
    model(feats, lengths)
    bad_feats, bad_lengths, words = {
        "int": (feats.long(), lengths, ["feats", "floating-point"]),
        "float64": (feats.double(), lengths, ["feats", "float64"]),
        "mels": (torch.randn(2, 20, 30), lengths, ["feats", "40"]),
        "lengths_long": (feats, torch.tensor([21, 12]), ["lengths"]),
        "lengths_batch": (feats, torch.tensor([20]), ["lengths"]),
        "short": (feats[:, :5], torch.tensor([5, 5]), ["lengths", "7"]),
    }[how]
    raises_naming(lambda: model(bad_feats, bad_lengths), *words)


CONFIG_CASES = [
    (LMConfig, {"vocab_size": 0}, "vocab_size"),
    (LMConfig, {"vocab_size": 5, "d_model": 10, "num_heads": 4}, "divisible"),
    (LMConfig, {"vocab_size": 5, "dropout": 1.5}, "dropout"),
    (LMConfig, {"vocab_size": 5, "dropout": "0.1"}, "dropout"),
    (LMConfig, {"vocab_size": 5, "activation": "tanh"}, "activation"),
    (LMConfig, {"vocab_size": 5, "norm": "batch"}, "norm"),
    (LMConfig, {"vocab_size": 5, "num_kv_heads": 3}, "num_kv_heads"),
    (LMConfig, {"vocab_size": 5, "eos_id": 1.5}, "eos_id"),
    (LMConfig, {"vocab_size": 5, "max_len": -1}, "max_len"),
    (Seq2SeqConfig, {"vocab_size": 5, "pad_id": 0.5}, "pad_id"),
    (Seq2SeqConfig, {"vocab_size": 5, "eos_id": 5}, "eos_id"),
    (Seq2SeqConfig, {"vocab_size": 5, "num_decoder_layers": 0}, "num_decoder_layers"),
    (ViTConfig, {"image_size": 9}, "patch_size"),
    (ViTConfig, {"dropout": 2.0}, "dropout"),
    (SpeechEncoderConfig, {"dim_feedforward": 0}, "dim_feedforward"),
    (SpeechEncoderConfig, {"conv_channels": 0}, "conv_channels"),
    (SpeechEncoderConfig, {"dropout": -0.5}, "dropout"),
    (SpeechEncoderConfig, {"activation": "tanh"}, "activation"),
    (SpeechEncoderConfig, {"n_mels": 3}, "n_mels"),
]


@pytest.mark.parametrize(
    ("config_class", "fields", "word"), CONFIG_CASES, ids=[w for _, _, w in CONFIG_CASES]
)
def test_model_configs_refuse_bad_fields(config_class, fields, word):
    raises_naming(lambda: config_class(**fields), word)


# -- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "/no/such/file.safetensors"], "not 'translation', 'image' or an existing"),
        (["show", "{bad}"], "is not a safetensors file"),
        (["translate", "Hello.", "--model", "/no/such/dir"], "no translation model in"),
        (["eval", "image", "--model", "/no/such/dir"], "no image model in"),
        (["demo", "layer", "--embed-dim", "0"], "embed_dim must be positive"),
        (["demo", "layer", "--embed-dim", "6", "--num-heads", "4"], "divisible"),
    ],
)
def test_cli_user_errors_are_one_line_without_traceback(argv, message, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 7)
    argv = [arg.replace("{bad}", str(bad)) for arg in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["train", "painting"], ["demo", "layer", "--embed-dim", "x"], ["eval"]],
)
def test_cli_bad_options_exit_2_with_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


@settings(max_examples=15)
@given(embed_dim=st.integers(-2, 12), num_heads=st.integers(-1, 5))
def test_cli_layer_demo_never_crashes(embed_dim, num_heads):
    """Any sizes: the demo runs (exit 0) or says what is wrong (exit 2), never a traceback."""
    argv = ["demo", "layer", "--embed-dim", str(embed_dim), "--num-heads", str(num_heads)]
    assert cli.main(argv) in (0, 2)


@pytest.mark.parametrize(
    ("error", "code", "word"),
    [
        (FloatingPointError("the loss is nan at step 7"), 1, "stopped: the loss is nan at step 7"),
        (PermissionError(13, "Permission denied", "runs/x"), 2, "Permission denied"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
    ids=["nonfinite", "oserror", "ctrl-c"],
)
def test_cli_reports_a_stopped_run_in_one_line(error, code, word, monkeypatch, capsys):
    class App:
        @staticmethod
        def main(options, prog):
            raise error

    monkeypatch.setattr(cli.train, "load_app", lambda task: App)
    assert cli.main(["train", "image"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]
