"""The tiled kernel beyond the shared grid of test_kernels.py: the fused per-tile path,
block skipping, dropout replay, and when `auto` chooses it.

The grid in test_kernels.py runs the tiled kernel with tiny tiles on every mask kind; there
value_dim differs from head_dim, which sends every tile down the written-out path. Here
head_dim == value_dim, so fp32 tiles run torch's fused CPU kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to, make_qkv, reference64, to64

from multihead import attention, explain, masks
from multihead.kernels import online_softmax, tiled

CASES = {  # (q_len, k_len, generator) → attention's mask arguments
    "none": lambda q, k, g: {},
    "causal": lambda q, k, g: {"causal": True},
    "causal_bottom_right": lambda q, k, g: {"causal": "bottom-right"},
    "padding_with_empty_row": lambda q, k, g: {"mask": masks.padding([k, 0], k, q_len=q)},
    "sliding_window": lambda q, k, g: {
        "mask": masks.sliding_window(q, k, window=3, align="bottom-right")
    },
    "float_bias": lambda q, k, g: {"mask": torch.randn(2, 1, q, k, generator=g)},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_tiles_match_float64_reference(case, dtype, kv_heads, gen):
    q, k, v = make_qkv(
        heads=4, kv_heads=kv_heads, q_len=9, k_len=11, head_dim=8, value_dim=8,
        dtype=dtype, generator=gen,
    )  # fmt: skip
    kwargs = CASES[case](9, 11, gen)
    if "mask" in kwargs and isinstance(kwargs["mask"], torch.Tensor):
        kwargs["mask"] = kwargs["mask"].to(dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, kernel="tiled", **kwargs)
    expected = reference64(to64(q), to64(k), to64(v), **kwargs)
    assert_close_to(out, expected, dtype)

    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * cotangent).sum(), (q, k, v))
    q64, k64, v64 = (to64(t).requires_grad_() for t in (q, k, v))
    ref = reference64(q64, k64, v64, **kwargs)
    want = torch.autograd.grad((ref * cotangent).sum(), (q64, k64, v64))
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert_close_to(g, w, dtype, grad=True)


def _count_tiles(monkeypatch) -> list[int]:
    """Each call's area: (queries × keys) of the score plane it covered."""
    calls: list[int] = []
    original = online_softmax.tile_forward

    def counting(tile):
        calls.append(tile.q.shape[-2] * tile.k.shape[-2])
        return original(tile)

    monkeypatch.setattr(online_softmax, "tile_forward", counting)
    return calls


@pytest.mark.parametrize(
    ("mask", "expected_tiles", "calls"),
    [
        (None, 8 * 8, 1),  # nothing to skip: one call
        # The diagonal and below: half the work. Each row block's visited tiles are one run,
        # one call, with a mask only on its cut diagonal tile.
        (masks.causal(16), 8 * 9 // 2, 8),
        # The diagonal and the one before, both cut by the window: one call per row block.
        (masks.sliding_window(16, window=2), 8 + 7, 8),
        # Documents of 4, 8, 4 tokens on 2-token tiles: the row blocks of a document visit
        # the same keys, so they merge: one call per document.
        (masks.documents([0] * 4 + [1] * 8 + [2] * 4), 4 + 16 + 4, 3),
    ],
    ids=["dense", "causal", "sliding_window", "documents"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "unfused"])
def test_empty_tiles_are_skipped(monkeypatch, mask, expected_tiles, calls, dtype, gen):
    monkeypatch.setattr(online_softmax, "BLOCK_K", 2)  # 2x2 tiles: 8x8 of them
    areas = _count_tiles(monkeypatch)
    q, k, v = make_qkv(q_len=16, k_len=16, head_dim=4, value_dim=4, dtype=dtype, generator=gen)
    out = attention(q, k, v, mask=mask, kernel="tiled")
    assert sum(areas) == expected_tiles * 2 * 2  # the work: only the tiles the mask leaves
    assert len(areas) == calls  # fused or written out, a run of visited tiles is one call
    assert_close_to(out, reference64(to64(q), to64(k), to64(v), mask=mask), dtype)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_one_tile_with_a_tensor_mask_matches_float64_reference(monkeypatch, kind, gen):
    """At the default tile size (256) the tiny inputs of the suite fit in one tile: the
    forward is one fused call, and the backward must use the same mask."""
    monkeypatch.setattr(online_softmax, "BLOCK_Q", 256)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 256)
    q, k, v = (t.requires_grad_() for t in make_qkv(generator=gen))
    if kind == "bool":
        mask = torch.rand(5, 7, generator=gen) < 0.6
        mask[:, 0] = True  # every query keeps a key
    else:
        mask = torch.randn(5, 7, generator=gen)
    out = attention(q, k, v, mask=mask, kernel="tiled")
    assert_close_to(out, reference64(to64(q), to64(k), to64(v), mask=mask), torch.float32)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (to64(t).requires_grad_() for t in (q, k, v))
    ref = reference64(q64, k64, v64, mask=mask)
    want = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    for g, w in zip(got, want, strict=True):
        assert_close_to(g, w, torch.float32, grad=True)


def test_dropout_backward_replays_the_forward_mask(gen):
    q, k, v = make_qkv(
        heads=2, kv_heads=1, q_len=5, k_len=7, head_dim=3, value_dim=3,
        dtype=torch.float64, generator=gen,
    )  # fmt: skip
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def dropped(q, k, v):
        torch.manual_seed(3)  # the same keep-mask at every evaluation
        return attention(q, k, v, dropout_p=0.4, causal=True, kernel="tiled")

    assert torch.autograd.gradcheck(dropped, inputs)
    plain = attention(q, k, v, causal=True, kernel="tiled")
    assert not torch.allclose(dropped(q, k, v), plain)


def test_returns_the_log_sum_exp(gen):
    q, k, v = make_qkv(q_len=6, k_len=9, head_dim=4, value_dim=4, generator=gen)
    _, lse = tiled.tiled_attention(q, k, v, mask=masks.causal(6, 9), block_q=2, block_k=4)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 2.0
    allowed = masks.causal(6, 9).to_dense()
    expected = scores.masked_fill(~allowed, -torch.inf).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)


def test_auto_prefers_tiled_for_a_sparse_mask_on_long_sequences(monkeypatch):
    monkeypatch.setattr(online_softmax, "BLOCK_Q", 256)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 256)
    q = torch.zeros(1, 1, 4096, 8)
    line = explain(q, q, q, mask=masks.sliding_window(4096, window=256))
    assert line.startswith("tiled:") and "block skipping" in line
    # Short sequences, and plain causal (SDPA's own fast path), stay with SDPA.
    short = torch.zeros(1, 1, 512, 8)
    assert explain(short, short, short, mask=masks.sliding_window(512, window=64)).startswith(
        "sdpa:"
    )
    assert explain(q, q, q, causal=True).startswith("sdpa:")


def test_auto_uses_tiled_when_the_score_matrix_would_be_too_big(monkeypatch):
    monkeypatch.setattr(tiled, "SCORE_MATRIX_BUDGET", 1000)
    q = torch.zeros(1, 2, 32, 4)
    assert explain(q, q, q, softcap=5.0).startswith("tiled:")
    monkeypatch.setattr(tiled, "SCORE_MATRIX_BUDGET", 1 << 30)
    assert explain(q, q, q, softcap=5.0).startswith("reference:")


def test_weights_are_refused_with_a_reason(gen):
    q, k, v = make_qkv(generator=gen)
    with pytest.raises(ValueError, match="tiled.*weight"):
        attention(q, k, v, kernel="tiled", return_weights=True)


def test_auto_prefers_block_skipping_on_the_cpu_only(monkeypatch):
    """Off the CPU a span runs written-out steps (an H200 ran SDPA with the dense mask 50x
    faster for a window of 256 at N=4096): `auto` runs FlexAttention there. Asked about
    tensors on the meta device (no data, not the CPU) it answers as for a GPU."""
    monkeypatch.setattr(online_softmax, "BLOCK_Q", 256)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 128)
    window = masks.sliding_window(4096, window=256)
    on_cpu = torch.zeros(1, 4, 4096, 8)
    elsewhere = torch.empty(1, 4, 4096, 8, device="meta")
    assert explain(on_cpu, on_cpu, on_cpu, mask=window).startswith("tiled:")
    assert explain(elsewhere, elsewhere, elsewhere, mask=window).startswith("flex:")
