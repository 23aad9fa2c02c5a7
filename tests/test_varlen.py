"""Packed ragged batches: attention_varlen equals the float64 reference run per sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to, randn, reference64, to64
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import multihead
from multihead import MultiHeadAttention, attention_varlen, masks, pack, unpack
from multihead.masks import EMPTY, FULL


@pytest.fixture(autouse=True, params=["per_sequence", "packed"])
def path(request, monkeypatch) -> str:
    """Run every test both ways: a call per sequence, and one tiled call over the pack."""
    from multihead import varlen

    threshold = 0 if request.param == "per_sequence" else 1 << 30
    monkeypatch.setattr(varlen, "PER_SEQUENCE_MIN_MEAN", threshold)
    return request.param


def cumulative(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])


def per_sequence_reference(
    q: Tensor, k: Tensor, v: Tensor, lens_q: list[int], lens_k: list[int], causal: bool, **kw
) -> Tensor:
    """The oracle: each sequence alone, in the library layout, through the float64 reference."""
    cu_q, cu_k = cumulative(lens_q), cumulative(lens_k)
    outputs = []
    for i in range(len(lens_q)):
        qi, ki, vi = (
            t[int(c[i]) : int(c[i + 1])].transpose(0, 1).unsqueeze(0)
            for t, c in ((q, cu_q), (k, cu_k), (v, cu_k))
        )
        out = reference64(qi, ki, vi, causal="bottom-right" if causal else False, **kw)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs, 0)


CASES = [  # (query lengths, key lengths): ragged, with empty and single-token sequences
    ([3, 0, 1, 5, 2], [3, 0, 1, 5, 2]),
    ([3, 0, 1, 5, 2], [2, 4, 1, 7, 0]),
]


@pytest.mark.parametrize("lens_q, lens_k", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads, softcap", [(4, None), (2, None), (2, 3.0)])
def test_matches_reference_per_sequence(
    lens_q: list[int], lens_k: list[int], causal: bool, kv_heads: int, softcap, gen
) -> None:
    q = randn(sum(lens_q), 4, 8, generator=gen).requires_grad_()
    k = randn(sum(lens_k), kv_heads, 8, generator=gen).requires_grad_()
    v = randn(sum(lens_k), kv_heads, 8, generator=gen).requires_grad_()
    grad = randn(sum(lens_q), 4, 8, generator=gen)
    out = attention_varlen(
        q, k, v, cumulative(lens_q), cumulative(lens_k), causal=causal, softcap=softcap
    )
    q64, k64, v64 = to64(q), to64(k), to64(v)
    expected = per_sequence_reference(q64, k64, v64, lens_q, lens_k, causal, softcap=softcap)
    assert out.shape == (sum(lens_q), 4, 8)
    assert_close_to(out, expected, torch.float32)

    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q64, k64, v64), grad.double(), allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert_close_to(g, torch.zeros_like(g) if w is None else w, torch.float32, grad=True)


def test_rows_without_keys_are_zero_with_finite_grads(gen) -> None:
    # Sequence 0: 3 queries, 1 key, causal bottom-right → its first 2 queries see nothing.
    # Sequence 1: 2 queries, 0 keys → nothing at all.
    lens_q, lens_k = [3, 2], [1, 0]
    q = randn(5, 2, 4, generator=gen).requires_grad_()
    k = randn(1, 2, 4, generator=gen).requires_grad_()
    v = randn(1, 2, 4, generator=gen).requires_grad_()
    out = attention_varlen(q, k, v, cumulative(lens_q), cumulative(lens_k), causal=True)
    assert out[[0, 1, 3, 4]].abs().max() == 0
    torch.testing.assert_close(out[2], v[0])  # the last query sees its one key
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bfloat16_and_int32_cu_seqlens(gen) -> None:
    lens = [4, 1, 6]
    q, k, v = (randn(11, 2, 8, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    cu = cumulative(lens).to(torch.int32)
    out = attention_varlen(q, k, v, cu, cu, causal=True)
    assert out.dtype == torch.bfloat16
    expected = per_sequence_reference(q, k, v, lens, lens, True)
    assert_close_to(out, expected, torch.bfloat16)


def test_dropout_is_reproducible_and_finite(gen) -> None:
    q, k, v = (randn(7, 2, 4, generator=gen).requires_grad_() for _ in range(3))
    cu = cumulative([3, 4])
    torch.manual_seed(0)
    first = attention_varlen(q, k, v, cu, cu, dropout_p=0.5)
    torch.manual_seed(0)
    second = attention_varlen(q, k, v, cu, cu, dropout_p=0.5)
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, attention_varlen(q, k, v, cu, cu))
    first.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_mask_is_block_diagonal_and_tiles_between_sequences_are_skipped() -> None:
    mask = masks.varlen(torch.tensor([0, 4, 8]))
    structure = mask.block_structure(4, 4)[0, 0]
    assert structure.tolist() == [[FULL, EMPTY], [EMPTY, FULL]]
    causal = masks.varlen(torch.tensor([0, 4, 8]), causal=True).block_structure(4, 4)[0, 0]
    assert causal[0, 1] == EMPTY and causal[1, 0] == EMPTY


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=4),
    st.booleans(),
)
def test_mask_equals_per_sequence_blocks(lengths: list[tuple[int, int]], causal: bool) -> None:
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    dense = masks.varlen(cumulative(lens_q), cumulative(lens_k), causal=causal).to_dense()[0, 0]
    expected = torch.zeros(sum(lens_q), sum(lens_k), dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk in lengths:
        block = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            block = masks.causal(lq, lk, align="bottom-right").to_dense()[0, 0]
        expected[q0 : q0 + lq, k0 : k0 + lk] = block
        q0, k0 = q0 + lq, k0 + lk
    assert torch.equal(dense, expected)


@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=5),
    st.booleans(),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_closed_form_block_structure_equals_the_generic_one(
    lengths: list[tuple[int, int]], causal: bool, block_q: int, block_k: int
) -> None:
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    mask = masks.varlen(cumulative(lens_q), cumulative(lens_k), causal=causal)
    generic = masks.Mask.block_structure(mask, block_q, block_k)  # from every (q, k) pair
    assert torch.equal(mask.block_structure(block_q, block_k), generic)


def test_pack_unpack_round_trip(gen) -> None:
    padded = randn(3, 5, 2, 4, generator=gen).requires_grad_()
    lengths = [5, 0, 2]
    packed, cu = pack(padded, lengths)
    assert packed.shape == (7, 2, 4) and cu.dtype == torch.int32 and cu.tolist() == [0, 5, 5, 7]
    torch.testing.assert_close(packed[5:], padded[2, :2])
    back = unpack(packed, cu, 5)
    keep = (torch.arange(5) < torch.tensor(lengths).unsqueeze(1)).view(3, 5, 1, 1)
    torch.testing.assert_close(back, padded * keep)
    assert unpack(packed, cu).shape == (3, 5, 2, 4)  # max_len defaults to the longest
    assert unpack(packed, cu, 7).shape == (3, 7, 2, 4)
    back.sum().backward()
    torch.testing.assert_close(padded.grad, keep.expand_as(padded).float())


def test_pack_and_unpack_reject_bad_input() -> None:
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 3\]"):
        pack(x, [4, 1])
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        pack(x, [1])
    with pytest.raises(TypeError, match="lengths must hold integers"):
        pack(x, torch.tensor([1.0, 2.0]))
    packed, cu = pack(x, [3, 1])
    with pytest.raises(ValueError, match="max_len is 2 but the longest sequence has 3"):
        unpack(packed, cu, 2)
    with pytest.raises(ValueError, match="cu_seqlens ends at 4 but packed packs 3"):
        unpack(packed[:3], cu)


@pytest.mark.parametrize(
    "cu_q, error, match",
    [
        (torch.tensor([0.0, 3.0, 5.0]), TypeError, "cu_seqlens_q must be an integer tensor"),
        ([0, 3, 5], TypeError, "cu_seqlens_q must be a torch.Tensor"),
        (torch.tensor([[0, 3, 5]]), ValueError, "cu_seqlens_q must be 1-D"),
        (torch.tensor([], dtype=torch.int64), ValueError, "cu_seqlens_q must be 1-D"),
        (torch.tensor([1, 3, 5]), ValueError, "cu_seqlens_q must start at 0"),
        (torch.tensor([0, 4, 3, 5]), ValueError, "cu_seqlens_q must be non-decreasing"),
        (torch.tensor([0, 3, 6]), ValueError, "cu_seqlens_q ends at 6 but query packs 5"),
        (torch.tensor([0, 5]), ValueError, "cu_seqlens_q has 1 sequences but cu_seqlens_k has 2"),
    ],
)
def test_bad_cu_seqlens_raise_naming_the_argument(cu_q, error, match) -> None:
    q, k, v = torch.zeros(5, 2, 4), torch.zeros(6, 2, 4), torch.zeros(6, 2, 4)
    with pytest.raises(error, match=match):
        attention_varlen(q, k, v, cu_q, torch.tensor([0, 2, 6]))


def test_bad_tensors_raise() -> None:
    q, cu = torch.zeros(5, 2, 4), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="query must be 3-D packed"):
        attention_varlen(q.unsqueeze(0), q, q, cu, cu)
    with pytest.raises(ValueError, match="cu_seqlens_k ends at 5 but key packs 4"):
        attention_varlen(q, q[:4], q[:4], cu, cu)
    with pytest.raises(ValueError, match="must divide the query's 2 heads"):
        attention_varlen(q, torch.zeros(5, 3, 4), torch.zeros(5, 3, 4), cu, cu)
    with pytest.raises(ValueError, match="scale must be"):
        attention_varlen(q, q, q, cu, cu, scale=-1.0)


@pytest.mark.parametrize("causal, positions", [(False, None), (True, None), (True, "rope")])
def test_module_with_cu_seqlens_equals_each_sentence_alone(causal: bool, positions, gen) -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, qk_norm=True, positions=positions).eval()
    lengths = [3, 1, 0, 5]
    sentences = [randn(1, n, 16, generator=gen) for n in lengths]
    packed = torch.cat([s[0] for s in sentences], 0).requires_grad_()
    out = layer(packed, causal=causal, cu_seqlens=cumulative(lengths))
    assert out.shape == (9, 16)
    expected = [layer(s, causal=causal)[0] for s in sentences if s.shape[1]]
    torch.testing.assert_close(out, torch.cat(expected, 0), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(packed.grad).all()


def test_module_with_cu_seqlens_rejects_what_it_cannot_do() -> None:
    x, cu = torch.zeros(5, 8), torch.tensor([0, 2, 5])
    layer = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must be packed \(total_tokens, 8\)"):
        layer(x.unsqueeze(0), cu_seqlens=cu)
    with pytest.raises(ValueError, match="mask cannot be used with cu_seqlens"):
        layer(x, mask=torch.ones(5, 5, dtype=torch.bool), cu_seqlens=cu)
    with pytest.raises(ValueError, match="need_weights cannot be used"):
        layer(x, need_weights="mean", cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens ends at 5 but query packs 4"):
        layer(x[:4], cu_seqlens=cu)


def test_exported() -> None:
    assert multihead.attention_varlen is attention_varlen
    assert {"attention_varlen", "pack", "unpack"} <= set(multihead.__all__)


@pytest.mark.parametrize("positions", ["alibi", "relative"])
@pytest.mark.parametrize("threshold", [1, 10**6], ids=["per_sequence", "packed"])
@pytest.mark.parametrize("causal", [False, True])
def test_position_biases_on_packed_input_equal_each_sequence_alone(
    monkeypatch, positions, threshold, causal
) -> None:
    """ALiBi and T5's bias read only the distance between two tokens of a sequence, so a
    packed batch gets what each sequence gets alone, on both of attention_varlen's paths."""
    from multihead import varlen

    monkeypatch.setattr(varlen, "PER_SEQUENCE_MIN_MEAN", threshold)
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, positions=positions).double()
    lengths = [5, 1, 7]
    x = torch.randn(sum(lengths), 16, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 13])
    packed = layer.forward_packed(x, cu, causal=causal)
    alone = torch.cat([layer(part.unsqueeze(0), causal=causal)[0] for part in x.split(lengths)])
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-10)
    (got,) = torch.autograd.grad(packed.square().sum(), x)
    (want,) = torch.autograd.grad(alone.square().sum(), x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
