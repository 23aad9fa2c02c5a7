"""`attention()` and `explain()`: kernel choice, empty keys, and validation of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_qkv
from hypothesis import given
from hypothesis import strategies as st

from multihead import attention, explain, masks
from multihead.kernels import KERNELS

# -- explain() names the kernel that actually runs -------------------------------------------


@pytest.fixture
def ran(monkeypatch) -> list[str]:
    """Records the NAME of every kernel whose forward() is called."""
    calls: list[str] = []
    for name, module in KERNELS.items():
        original = module.forward

        def spy(request, _name=name, _original=original):
            calls.append(_name)
            return _original(request)

        monkeypatch.setattr(module, "forward", spy)
    return calls


EXPLAIN_CASES = [
    # (kwargs, kernel expected to run, phrases the line must contain)
    pytest.param({}, "sdpa", ["no mask"], id="plain"),
    pytest.param({"causal": True}, "sdpa", ["is_causal fast path"], id="causal"),
    pytest.param({"causal": "top-left"}, "sdpa", ["is_causal fast path"], id="top-left"),
    pytest.param(
        {"causal": "bottom-right", "square": True},
        "sdpa",
        ["is_causal fast path"],
        id="bottom-right-square",
    ),
    pytest.param({"causal": "bottom-right"}, "sdpa", ["dense boolean mask"], id="bottom-right"),
    pytest.param(
        {"causal": True, "mask": "padding"}, "sdpa", ["dense boolean mask"], id="causal+padding"
    ),
    pytest.param({"mask": "float"}, "sdpa", ["additive float mask"], id="float-mask"),
    pytest.param({"kv_heads": 2}, "sdpa", ["grouped-query 4/2"], id="gqa"),
    pytest.param(
        {"return_weights": True},
        "reference",
        ["weights were requested", "sdpa skipped: it does not return attention weights"],
        id="weights",
    ),
    pytest.param({"softcap": 5.0}, "reference", ["soft-capping", "sdpa skipped"], id="softcap"),
    pytest.param({"kernel": "reference"}, "reference", ["chosen explicitly"], id="explicit"),
    pytest.param(
        {"kernel": "reference", "causal": True},
        "reference",
        ["chosen explicitly"],
        id="explicit-causal",
    ),
]


@pytest.mark.parametrize(("kwargs", "expected", "phrases"), EXPLAIN_CASES)
def test_explain_names_the_kernel_that_runs(kwargs, expected, phrases, ran, gen):
    kwargs = dict(kwargs)
    k_len = 5 if kwargs.pop("square", False) else 7
    q, k, v = make_qkv(kv_heads=kwargs.pop("kv_heads", 4), q_len=5, k_len=k_len, generator=gen)
    if kwargs.get("mask") == "padding":
        kwargs["mask"] = masks.padding([7, 3], max_len=7, q_len=5)
    elif kwargs.get("mask") == "float":
        kwargs["mask"] = torch.randn(5, 7, generator=gen)

    line = explain(q, k, v, **kwargs)
    assert "\n" not in line
    assert line.split(":")[0] == expected
    for phrase in phrases:
        assert phrase in line
    if "is_causal" not in phrases[0]:
        assert "is_causal" not in line

    attention(q, k, v, **kwargs)
    assert ran == [expected]


def test_explain_reports_empty_keys(gen):
    q, k, v = make_qkv(k_len=0, generator=gen)
    assert explain(q, k, v).startswith("none:")


def test_explain_validates_like_attention(gen):
    q, k, v = make_qkv(generator=gen)
    with pytest.raises(ValueError, match="mask"):
        explain(q, k, v, mask=torch.ones(2, 5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="kernel 'sdpa' cannot run"):
        explain(q, k, v, kernel="sdpa", return_weights=True)


def test_sdpa_with_return_weights_raises(gen):
    q, k, v = make_qkv(generator=gen)
    with pytest.raises(ValueError, match="kernel 'sdpa' cannot run this call.*weights"):
        attention(q, k, v, kernel="sdpa", return_weights=True)


def test_auto_equals_each_kernel(gen):
    q, k, v = make_qkv(kv_heads=2, generator=gen)
    mask = masks.padding([7, 2], max_len=7, q_len=5)
    auto = attention(q, k, v, mask=mask, causal=True)
    for kernel in KERNELS:
        torch.testing.assert_close(attention(q, k, v, mask=mask, causal=True, kernel=kernel), auto)


def test_causal_spellings_agree(gen):
    q, k, v = make_qkv(q_len=6, k_len=6, generator=gen)
    expected = attention(q, k, v, mask=masks.causal(6))
    for causal in (True, "top-left", "bottom-right"):
        torch.testing.assert_close(attention(q, k, v, causal=causal), expected)
    torch.testing.assert_close(attention(q, k, v, causal=False), attention(q, k, v))


def test_two_dim_and_four_dim_masks_agree(gen):
    q, k, v = make_qkv(generator=gen)
    allowed = torch.rand(5, 7, generator=gen) < 0.6
    torch.testing.assert_close(
        attention(q, k, v, mask=allowed), attention(q, k, v, mask=allowed.view(1, 1, 5, 7))
    )


# -- empty keys ------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("causal", [False, "bottom-right"])
def test_empty_keys_give_zeros(kernel, causal, gen):
    q, k, v = make_qkv(k_len=0, value_dim=3, generator=gen)
    out = attention(q, k, v, kernel=kernel, causal=causal)
    assert out.shape == (2, 4, 5, 3)
    assert torch.equal(out, torch.zeros(2, 4, 5, 3))


def test_empty_keys_with_weights_and_mask(gen):
    q, k, v = make_qkv(k_len=0, generator=gen)
    out, weights = attention(
        q, k, v, mask=masks.padding([0, 0], max_len=0, q_len=5), return_weights=True
    )
    assert torch.equal(out, torch.zeros_like(q))
    assert weights.shape == (2, 4, 5, 0)


def test_empty_keys_still_validate_the_kernel(gen):
    q, k, v = make_qkv(k_len=0, generator=gen)
    with pytest.raises(ValueError, match="kernel must be"):
        attention(q, k, v, kernel="flash")
    with pytest.raises(ValueError, match="kernel 'sdpa' cannot run"):
        attention(q, k, v, kernel="sdpa", return_weights=True)


# -- bad input (hypothesis) ------------------------------------------------------------------
@st.composite
def valid_calls(draw):
    """Shapes of a valid call: (batch, heads, kv_heads, q_len, k_len, head_dim, value_dim)."""
    batch = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    q_len, k_len = draw(st.integers(1, 4)), draw(st.integers(0, 4))
    head_dim, value_dim = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return batch, heads, kv_heads, q_len, k_len, head_dim, value_dim


def _tensors(shape):
    b, h, kvh, q_len, k_len, d, dv = shape
    return {
        "query": torch.randn(b, h, q_len, d),
        "key": torch.randn(b, kvh, k_len, d),
        "value": torch.randn(b, kvh, k_len, dv),
    }


def _not_tensor(data, shape, call):
    name = data.draw(st.sampled_from(["query", "key", "value"]))
    call[name] = data.draw(
        st.sampled_from([call[name].tolist(), call[name].numpy(), None, 1.0, "q"])
    )
    return TypeError, f"{name} must be a torch.Tensor"


def _integer_dtype(data, shape, call):
    name = data.draw(st.sampled_from(["query", "key", "value"]))
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]))
    call[name] = call[name].to(dtype)
    return TypeError, f"{name} must be a floating-point tensor"


def _wrong_rank(data, shape, call):
    name = data.draw(st.sampled_from(["query", "key", "value"]))
    how = data.draw(st.sampled_from(["flatten", "unsqueeze", "1d"]))
    t = call[name]
    call[name] = {"flatten": t.flatten(0, 1), "unsqueeze": t.unsqueeze(0), "1d": t.flatten()}[how]
    return ValueError, f"{name} must be 4-D"


def _mismatched_batch(data, shape, call):
    name = data.draw(st.sampled_from(["key", "value"]))
    extra = call[name][:1]
    call[name] = torch.cat([call[name], extra])
    return ValueError, f"{name} has batch size {shape[0] + 1} but query has {shape[0]}"


def _head_dim(data, shape, call):
    d = shape[5]
    new = data.draw(st.integers(1, 6).filter(lambda x: x != d))
    call["key"] = torch.randn(*call["key"].shape[:3], new)
    return ValueError, f"key has head_dim {new} but query has head_dim {d}"


def _kv_heads_not_dividing(data, shape, call):
    b, h, _, _, k_len, d, dv = shape
    kvh = data.draw(st.integers(2, 7).filter(lambda x: h % x != 0))
    call["key"], call["value"] = torch.randn(b, kvh, k_len, d), torch.randn(b, kvh, k_len, dv)
    return ValueError, f"key/value have {kvh} heads, which must divide the query's {h} heads"


def _kv_heads_mismatch(data, shape, call):
    b, _, kvh, _, k_len, _, dv = shape
    other = data.draw(st.integers(1, 4).filter(lambda x: x != kvh))
    call["value"] = torch.randn(b, other, k_len, dv)
    return ValueError, f"key has {kvh} heads but value has {other}"


def _kv_length_mismatch(data, shape, call):
    b, _, kvh, _, k_len, _, dv = shape
    other = data.draw(st.integers(0, 5).filter(lambda x: x != k_len))
    call["value"] = torch.randn(b, kvh, other, dv)
    return ValueError, f"key has {k_len} positions but value has {other}"


def _dtype_mismatch(data, shape, call):
    name = data.draw(st.sampled_from(["key", "value"]))
    dtype = data.draw(st.sampled_from([torch.float64, torch.bfloat16, torch.float16]))
    call[name] = call[name].to(dtype)
    return TypeError, f"{name} has dtype {dtype} but query has torch.float32"


def _mask_wrong_rank(data, shape, call):
    b, h, _, q_len, k_len, _, _ = shape
    mask_shape = data.draw(
        st.sampled_from([(b, q_len, k_len), (h, q_len, k_len), (k_len,), (1, b, h, q_len, k_len)])
    )
    call["mask"] = torch.ones(
        mask_shape, dtype=data.draw(st.sampled_from([torch.bool, torch.float32]))
    )
    return ValueError, r"mask must be 2-D \(q_len, k_len\) or 4-D"


def _mask_wrong_shape(data, shape, call):
    b, h, _, q_len, k_len, _, _ = shape
    good = [b, h, q_len, k_len]
    dim = data.draw(st.integers(0, 3))
    good[dim] += data.draw(st.integers(1, 2))
    if data.draw(st.booleans()) and dim >= 2:
        good = good[2:]  # a 2-D mask of the wrong size
    call["mask"] = torch.ones(good, dtype=torch.bool)
    return ValueError, r"mask has shape .* not broadcastable"


def _mask_wrong_dtype(data, shape, call):
    _, _, _, q_len, k_len, _, _ = shape
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.uint8]))
    call["mask"] = torch.ones(q_len, k_len, dtype=dtype)
    return TypeError, "mask must be bool .* or floating"


def _mask_not_tensor(data, shape, call):
    _, _, _, q_len, k_len, _, _ = shape
    call["mask"] = data.draw(
        st.sampled_from([[[True] * k_len] * q_len, np.ones((q_len, k_len), bool), "causal"])
    )
    return TypeError, "mask must be a multihead Mask or a torch.Tensor"


def _mask_object_wrong_size(data, shape, call):
    _, _, _, q_len, k_len, _, _ = shape
    dq, dk = data.draw(st.sampled_from([(1, 0), (0, 1), (1, 1)]))
    call["mask"] = masks.causal(q_len + dq, k_len + dk)
    return ValueError, f"mask is {q_len + dq}x{k_len + dk} .* inputs are {q_len}x{k_len}"


def _mask_object_wrong_batch(data, shape, call):
    b, _, _, q_len, k_len, _, _ = shape
    other = data.draw(st.integers(1, 4).filter(lambda x: x != b))
    call["mask"] = masks.padding([k_len] * other, max_len=k_len, q_len=q_len)
    return ValueError, f"mask was built for batch size {other} but query has {b}"


def _bad_causal(data, shape, call):
    call["causal"] = data.draw(
        st.sampled_from(["left", "TOP-LEFT", "causal", 1, 0, 2.0, "bottom_right", (True,)])
    )
    return ValueError, "causal must be True, False, 'top-left' or 'bottom-right'"


def _bad_scale(data, shape, call):
    call["scale"] = data.draw(
        st.floats(max_value=0.0)
        | st.just(math.nan)
        | st.just(math.inf)
        | st.just(True)
        | st.just("0.5")
        | st.just(-3)
    )
    return ValueError, "scale must be a positive finite number"


def _bad_dropout(data, shape, call):
    call["dropout_p"] = data.draw(
        st.floats(max_value=0.0, exclude_max=True)
        | st.floats(min_value=1.0)
        | st.just(math.nan)
        | st.just("0.1")
        | st.just(1)
        | st.just(False)
    )
    return ValueError, r"dropout_p must be in \[0, 1\)"


def _bad_softcap(data, shape, call):
    call["softcap"] = data.draw(
        st.floats(max_value=0.0) | st.just(math.nan) | st.just(math.inf) | st.just("30")
    )
    return ValueError, "softcap must be a positive finite number"


def _unknown_kernel(data, shape, call):
    call["kernel"] = data.draw(
        st.text(max_size=8).filter(lambda s: s not in ("auto", "sdpa", "reference"))
    )
    return ValueError, "kernel must be 'auto' or one of"


BAD_INPUTS = [
    _not_tensor,
    _integer_dtype,
    _wrong_rank,
    _mismatched_batch,
    _head_dim,
    _kv_heads_not_dividing,
    _kv_heads_mismatch,
    _kv_length_mismatch,
    _dtype_mismatch,
    _mask_wrong_rank,
    _mask_wrong_shape,
    _mask_wrong_dtype,
    _mask_not_tensor,
    _mask_object_wrong_size,
    _mask_object_wrong_batch,
    _bad_causal,
    _bad_scale,
    _bad_dropout,
    _bad_softcap,
    _unknown_kernel,
]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
@given(shape=valid_calls(), data=st.data())
def test_bad_input_raises_naming_the_argument(corrupt, shape, data):
    call = _tensors(shape)
    attention(**call)  # the uncorrupted call is valid
    error, match = corrupt(data, shape, call)
    with pytest.raises(error, match=match):
        attention(**call)


def test_one_query_after_a_cache_builds_no_mask():
    """Bottom-right causal with a single query sees every key: no mask, same result."""
    q = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    assert "no mask" in explain(q, k, v, causal="bottom-right")
    torch.testing.assert_close(
        attention(q, k, v, causal="bottom-right"),
        attention(q, k, v, mask=torch.ones(1, 9, dtype=torch.bool), kernel="reference"),
    )
