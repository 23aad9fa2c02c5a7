"""Shared helpers for the core test suite.

The oracles live here: ``naive_attention`` is the formula written out with no help from the
library (explicit head repetition, explicit -inf masking), and ``reference64`` runs the
library's reference kernel in float64. Tolerances are set by dtype in one place.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import Tensor

import multihead

settings.register_profile(
    "core",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("core")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "wheel: builds the wheel and runs it from a fresh venv (about a minute)"
    )


# Tiny shapes: extra intra-op threads only fight over the 2 shared cores (measured: the core
# suite takes ~3x longer with torch's default thread count).
torch.set_num_threads(1)


DTYPES = [torch.float32, torch.bfloat16]
KERNEL_NAMES = ["sdpa", "reference", "tiled"]


@pytest.fixture(autouse=True)
def _tiny_tiles(monkeypatch):
    """Tiles of 2 queries × 3 keys, so the tiny test shapes span many tiles: every merge,
    skip and partial-tile path of the tiled kernel runs."""
    from multihead.kernels import online_softmax

    monkeypatch.setattr(online_softmax, "BLOCK_Q", 2)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 3)


# (atol, rtol) against a float64 oracle, for forward outputs and for gradients.
_FORWARD_TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
_GRAD_TOL = {  # gradients accumulate over more terms: a little looser
    torch.float64: (1e-10, 1e-8),
    torch.float32: (3e-5, 3e-5),
    torch.bfloat16: (3e-2, 2e-2),
}


def tolerance(dtype: torch.dtype, *, grad: bool = False) -> dict[str, float]:
    """Keyword arguments for ``torch.testing.assert_close`` at the precision of ``dtype``."""
    atol, rtol = (_GRAD_TOL if grad else _FORWARD_TOL)[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close_to(actual: Tensor, expected: Tensor, dtype: torch.dtype, *, grad=False) -> None:
    """Compare a low-precision result with a float64 oracle at the tolerance of ``dtype``."""
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        check_dtype=False,
        **tolerance(dtype, grad=grad),
    )


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator, so each test draws the same numbers every run."""
    return torch.Generator().manual_seed(1234)


def randn(*shape: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def make_qkv(
    *,
    batch: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    q_len: int = 5,
    k_len: int = 7,
    head_dim: int = 8,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random (query, key, value) in the library layout (batch, heads, seq, dim)."""
    kv_heads = heads if kv_heads is None else kv_heads
    value_dim = head_dim if value_dim is None else value_dim
    q = randn(batch, heads, q_len, head_dim, generator=generator, dtype=dtype)
    k = randn(batch, kv_heads, k_len, head_dim, generator=generator, dtype=dtype)
    v = randn(batch, kv_heads, k_len, value_dim, generator=generator, dtype=dtype)
    return q, k, v


def to64(tensor: Tensor) -> Tensor:
    """A float64 leaf copy (keeps the low-precision rounding of the input, nothing else)."""
    return tensor.detach().to(torch.float64).requires_grad_(tensor.requires_grad)


def reference64(query: Tensor, key: Tensor, value: Tensor, **kwargs) -> Tensor:
    """The library's reference kernel in float64 on the same (rounded) inputs.

    Float64 inputs are used as they are, so gradients can be taken with respect to them.
    """
    mask = kwargs.get("mask")
    if isinstance(mask, Tensor) and mask.dtype.is_floating_point:
        kwargs["mask"] = mask.to(torch.float64)
    query, key, value = (t if t.dtype == torch.float64 else to64(t) for t in (query, key, value))
    return multihead.attention(query, key, value, kernel="reference", **kwargs)


def naive_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ · scale [+ bias]) V, written out without the library.

    ``allowed``: bool, broadcastable to (batch, heads, q_len, k_len), True = may attend.
    Key/value heads are repeated (repeat_interleave) to match the query heads. A row with no
    allowed key gets weights 0. Returns (output, weights).
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    visible = scores != -math.inf
    if allowed is not None:
        visible = visible & allowed
    row_max = torch.where(visible, scores, -math.inf).amax(-1, keepdim=True)
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    exp = torch.where(visible, torch.exp(scores - row_max), 0.0)
    total = exp.sum(-1, keepdim=True)
    weights = torch.where(total > 0, exp / torch.where(total > 0, total, 1.0), 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", weights, value), weights
