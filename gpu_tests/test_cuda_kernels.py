"""Every kernel on the device against the float64 CPU oracle: masks, GQA, forward and backward.

The grid: kernel ("reference", "sdpa", "tiled", "auto", and "flex" on CUDA) × dtype (fp32,
bf16, fp16) × head layout (MHA 4/4, GQA 4/2, MQA 4/1) × mask. Masks are passed to the library
as `Mask`s (built from device tensors where they take tensors), tensors on the device, or
``causal=``, and built again by hand (arange comparisons) on the CPU for the oracle. On CUDA
the tiled kernel runs its written-out tiles (torch's fused flash kernel it calls is CPU only);
small tiles here make the shapes span many of them, so that skipping, full runs and cut tiles
all run.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, ON_CUDA, assert_close, leaf64, oracle, randn
from torch import Tensor

import multihead as mh
from multihead import masks
from multihead.kernels import tiled

try:  # where the tile sizes live moved from kernels/tiled.py to kernels/online_softmax.py
    from multihead.kernels import online_softmax as tile_engine
except ImportError:  # pragma: no cover - the older layout
    tile_engine = tiled

# Flex runs where it has a backward (torch has none for it on the CPU).
KERNELS = ["reference", "sdpa", "tiled", "auto"] + (["flex"] if ON_CUDA else [])
BATCH, HEADS, HEAD_DIM = 2, 4, 64
LAYOUTS = {"mha": 4, "gqa4/2": 2, "mqa4/1": 1}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 queries × 48 keys: lengths of a few hundred span dozens of tiles."""
    monkeypatch.setattr(tile_engine, "BLOCK_Q", 64)
    monkeypatch.setattr(tile_engine, "BLOCK_K", 48)


@dataclass
class Case:
    q_len: int
    k_len: int
    kwargs: dict  # for the library, on the device
    allowed: Tensor | None = None  # bool on the CPU, broadcastable to (B, H, Q, K), by hand
    bias: Tensor | None = None  # float on the CPU, broadcastable to (B, H, Q, K)


def by_hand(q_len: int, k_len: int) -> tuple[Tensor, Tensor]:
    return torch.arange(q_len).view(-1, 1), torch.arange(k_len).view(1, -1)


def make_case(name: str, device: torch.device, gen: torch.Generator) -> Case:
    if name == "none":
        return Case(192, 320, {})
    if name == "causal":
        i, j = by_hand(300, 300)
        return Case(300, 300, {"causal": True}, j <= i)
    if name == "causal_bottom_right":
        i, j = by_hand(100, 300)
        return Case(100, 300, {"causal": "bottom-right"}, j <= i + 200)
    if name == "causal_bottom_right_tall":  # more queries than keys: the first 180 see nothing
        i, j = by_hand(300, 120)
        return Case(300, 120, {"causal": "bottom-right"}, j <= i - 180)
    if name == "padding":  # batch element 1 has no keys at all: every row of it is empty
        lengths = [301, 0]
        mask = masks.padding(torch.tensor(lengths, device=device), max_len=320, q_len=192)
        _, j = by_hand(192, 320)
        allowed = torch.stack([(j < n).expand(192, 320) for n in lengths]).unsqueeze(1)
        return Case(192, 320, {"mask": mask}, allowed)
    if name == "sliding_window":
        i, j = by_hand(400, 400)
        mask = masks.sliding_window(400, window=96)
        return Case(400, 400, {"mask": mask}, (j <= i) & (j > i - 96))
    if name == "documents_causal":
        ids = torch.tensor([[0] * 70 + [1] * 130 + [2] * 100, [0] * 250 + [1] * 50])
        mask = masks.documents(ids.to(device)) & masks.causal(300)
        i, j = by_hand(300, 300)
        same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # (B, Q, K)
        return Case(300, 300, {"mask": mask}, (same & (j <= i)).unsqueeze(1))
    if name == "padding_and_causal_flag":
        lengths = [300, 150]
        mask = masks.padding(torch.tensor(lengths, device=device), max_len=300)
        i, j = by_hand(300, 300)
        allowed = torch.stack([(j < n) & (j <= i) for n in lengths]).unsqueeze(1)
        return Case(300, 300, {"mask": mask, "causal": True}, allowed)
    if name == "bool_tensor":  # per batch element, with one row that sees nothing
        allowed = torch.rand(BATCH, 1, 192, 320, generator=gen) < 0.6
        allowed[0, 0, 5] = False
        return Case(192, 320, {"mask": allowed.to(device)}, allowed)
    if name == "float_bias":  # per head, with a fully masked row and a masked key
        bias = randn(BATCH, HEADS, 192, 320, generator=gen, dtype=torch.float32)
        bias[0, 1, 7] = -math.inf
        bias[1, :, :, 11] = -math.inf
        return Case(192, 320, {"mask": bias.to(device)}, bias=bias)
    if name == "float_bias_causal_bottom_right":
        bias = randn(BATCH, 1, 100, 300, generator=gen, dtype=torch.float32)
        i, j = by_hand(100, 300)
        kwargs = {"mask": bias.to(device), "causal": "bottom-right"}
        return Case(100, 300, kwargs, j <= i + 200, bias)
    raise KeyError(name)


CASES = [
    "none",
    "causal",
    "causal_bottom_right",
    "causal_bottom_right_tall",
    "padding",
    "sliding_window",
    "documents_causal",
    "padding_and_causal_flag",
    "bool_tensor",
    "float_bias",
    "float_bias_causal_bottom_right",
]


def qkv(batch, heads, kv_heads, q_len, k_len, head_dim, value_dim, dtype, gen):
    """Random (q, k, v) rounded to ``dtype``, on the CPU."""
    return (
        randn(batch, heads, q_len, head_dim, generator=gen, dtype=dtype),
        randn(batch, kv_heads, k_len, head_dim, generator=gen, dtype=dtype),
        randn(batch, kv_heads, k_len, value_dim, generator=gen, dtype=dtype),
    )


def check_against_oracle(
    inputs: tuple[Tensor, Tensor, Tensor],
    case: Case,
    kernel: str,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    weights: bool = False,
) -> Tensor:
    """Forward and backward of ``multihead.attention`` on the device against the oracle.
    Returns the device output."""
    q, k, v = (t.to(device).requires_grad_(True) for t in inputs)
    result = mh.attention(q, k, v, kernel=kernel, return_weights=weights, **case.kwargs)
    out, got_weights = result if weights else (result, None)
    assert out.device.type == device.type and out.dtype == dtype

    q64, k64, v64 = (leaf64(t) for t in inputs)
    expected, expected_weights = oracle(q64, k64, v64, case.allowed, case.bias)
    assert_close(out, expected, dtype, what=f"{kernel} output")
    if got_weights is not None:
        assert_close(got_weights, expected_weights, dtype, what=f"{kernel} weights")

    cotangent = randn(*out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), cotangent.to(device))
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), cotangent.double())
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        assert_close(got, want, dtype, grad=True, what=f"{kernel} d{name}")
    return out


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_float64_oracle(kernel, dtype, layout, case_name, device):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case_name}/{layout}".encode()))
    case = make_case(case_name, device, gen)
    inputs = qkv(BATCH, HEADS, LAYOUTS[layout], case.q_len, case.k_len, HEAD_DIM, HEAD_DIM,
                 dtype, gen)  # fmt: skip
    check_against_oracle(inputs, case, kernel, dtype, device, gen, weights=kernel == "reference")


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kernel", KERNELS)
def test_value_dim_differs_from_head_dim(kernel, dtype, device):
    gen = torch.Generator().manual_seed(5)
    case = make_case("causal_bottom_right", device, gen)
    inputs = qkv(BATCH, HEADS, 2, case.q_len, case.k_len, 32, 48, dtype, gen)
    check_against_oracle(inputs, case, kernel, dtype, device, gen)


def empty_rows_case(how: str, device: torch.device, gen: torch.Generator) -> Case:
    """200 queries × 130 keys where many rows see no key at all."""
    if how == "structured":  # batch element 1 is all padding; bottom-right hides 70 rows
        lengths = torch.tensor([130, 0])
        mask = masks.padding(lengths.to(device), max_len=130, q_len=200)
        mask = mask & masks.causal(200, 130, align="bottom-right")
        i, j = by_hand(200, 130)
        allowed = (j < lengths.view(-1, 1, 1)) & (j <= i - 70)
        return Case(200, 130, {"mask": mask}, allowed.unsqueeze(1))
    allowed = torch.rand(BATCH, 1, 200, 130, generator=gen) < 0.5
    allowed[0, 0, :17] = False  # a block of empty rows
    allowed[1, 0, 100] = False  # and a single one
    return Case(200, 130, {"mask": allowed.to(device)}, allowed)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("how", ["structured", "bool_tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows_give_zeros_and_finite_grads(kernel, dtype, how, device):
    """Rows with no visible key: output exactly 0 (and weights 0), finite gradients, the
    query gradient of such a row 0, and every gradient as the oracle's."""
    gen = torch.Generator().manual_seed(9)
    case = empty_rows_case(how, device, gen)
    inputs = qkv(BATCH, HEADS, 2, case.q_len, case.k_len, HEAD_DIM, HEAD_DIM, dtype, gen)
    q, k, v = (t.to(device).requires_grad_(True) for t in inputs)
    weights = kernel == "reference"
    result = mh.attention(q, k, v, kernel=kernel, return_weights=weights, **case.kwargs)
    out, got_weights = result if weights else (result, None)
    assert case.allowed is not None
    empty = ~case.allowed.any(-1).expand(BATCH, HEADS, case.q_len)  # (B, H, Q)
    assert int(empty.sum()) > 0
    assert (out.detach().cpu()[empty] == 0).all(), "an empty row is not exactly 0"
    if got_weights is not None:
        assert (got_weights.detach().cpu()[empty] == 0).all(), "an empty row has weights"
    out.float().square().sum().backward()
    for name, t in (("query", q), ("key", k), ("value", v)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"d{name} is not finite"
    assert q.grad is not None and (q.grad.cpu()[empty] == 0).all(), "an empty row's dquery"
    check_against_oracle(inputs, case, kernel, dtype, device, gen, weights=weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_auto_on_a_long_sliding_window(dtype, device):
    """A sliding window over >= 2048 keys: on the CPU `auto` picks the tiled kernel (block
    skipping); on CUDA, where the tiled kernel runs written-out steps (SDPA with the dense
    mask was 50x faster at N=4096 on an H200), FlexAttention. Both, and the tiled kernel
    asked for by name, against the oracle, forward and backward."""
    n = 4096 if device.type == "cuda" else 2048
    gen = torch.Generator().manual_seed(3)
    i, j = by_hand(n, n)
    case = Case(n, n, {"mask": masks.sliding_window(n, window=256)}, (j <= i) & (j > i - 256))
    inputs = qkv(1, 4, 2, n, n, HEAD_DIM, HEAD_DIM, dtype, gen)
    line = mh.explain(*(t.to(device) for t in inputs), **case.kwargs)
    assert line.startswith("tiled" if device.type == "cpu" else "flex"), line
    check_against_oracle(inputs, case, "auto", dtype, device, gen)
    check_against_oracle(inputs, case, "tiled", dtype, device, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_tiled_kernel_at_default_tiles_causal(dtype, device):
    """The tiled kernel at its default tiles: causal over 1000 positions (cut tiles on the
    diagonal and at the ragged end, skipped tiles above it)."""
    gen = torch.Generator().manual_seed(4)
    i, j = by_hand(1000, 1000)
    case = Case(1000, 1000, {"causal": True}, j <= i)
    inputs = qkv(2, 4, 4, 1000, 1000, HEAD_DIM, HEAD_DIM, dtype, gen)
    check_against_oracle(inputs, case, "tiled", dtype, device, gen)


def _varlen_oracle(q, k, v, cu_q, cu_k, causal):
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[s0:s1] for t, s0, s1 in ((q, cu_q[b], cu_q[b + 1]),
                                                  (k, cu_k[b], cu_k[b + 1]),
                                                  (v, cu_k[b], cu_k[b + 1])))  # fmt: skip
        n_q, n_k = qs.shape[0], ks.shape[0]
        if n_q == 0:
            continue
        i, j = by_hand(n_q, n_k)
        allowed = j <= i + (n_k - n_q) if causal else None
        out, _ = oracle(*(t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs)), allowed)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("regime", ["per_sequence", "one_tiled_call"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_attention_varlen(dtype, regime, causal, device):
    """Packed ragged batches (flash-attn's varlen layout), GQA 4/2: long sequences get a call
    each, short ones one tiled call under the block-diagonal mask."""
    gen = torch.Generator().manual_seed(6)
    if regime == "per_sequence":
        lens_q, lens_k = [40, 0, 17, 100, 33], [40, 5, 30, 100, 33]
    else:
        lens_q, lens_k = [5, 1, 9, 3, 0, 7, 12], [5, 2, 9, 6, 3, 7, 12]
    cu_q = [0] + torch.tensor(lens_q).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(lens_k).cumsum(0).tolist()
    q = randn(cu_q[-1], HEADS, HEAD_DIM, generator=gen, dtype=dtype)
    k = randn(cu_k[-1], 2, HEAD_DIM, generator=gen, dtype=dtype)
    v = randn(cu_k[-1], 2, HEAD_DIM, generator=gen, dtype=dtype)
    qd, kd, vd = (t.to(device).requires_grad_(True) for t in (q, k, v))
    out = mh.attention_varlen(
        qd, kd, vd,
        torch.tensor(cu_q, dtype=torch.int32, device=device),
        torch.tensor(cu_k, dtype=torch.int32, device=device),
        causal=causal,
    )  # fmt: skip
    q64, k64, v64 = (leaf64(t) for t in (q, k, v))
    expected = _varlen_oracle(q64, k64, v64, cu_q, cu_k, causal)
    assert_close(out, expected, dtype, what="attention_varlen output")
    cotangent = randn(*out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, (qd, kd, vd), cotangent.to(device))
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), cotangent.double())
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        assert_close(got, want, dtype, grad=True, what=f"attention_varlen d{name}")


@pytest.mark.skipif(not ON_CUDA, reason="checks where the tiled kernel runs on CUDA")
def test_tiled_kernel_does_not_use_the_cpu_fused_kernel_on_cuda(device):
    q = torch.randn(1, 2, 300, HEAD_DIM, device=device, dtype=torch.bfloat16)
    if hasattr(tile_engine, "fused_available"):
        assert not tile_engine.fused_available(q, q, None)
    else:
        assert not tiled._use_fused(q, q, None, None)
