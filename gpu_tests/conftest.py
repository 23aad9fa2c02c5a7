"""What the CUDA checks share: the device, the float64 CPU oracle and the tolerances.

Every check runs the library on ``DEVICE`` (default ``cuda``) and compares with an oracle
computed on the CPU in float64 from the same (rounded) inputs. ``MULTIHEAD_GPU_CHECK_DEVICE=cpu``
runs the same checks on the CPU, to try the checks' own logic on a machine without a GPU
(keep the shapes there small: the CPU path of some kernels differs, e.g. the tiled kernel
calls torch's fused CPU flash kernel instead of its written-out tiles).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor

DEVICE = torch.device(os.environ.get("MULTIHEAD_GPU_CHECK_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def pytest_collection_modifyitems(config, items):
    """Without the device, every check skips saying why (``make gpu-check`` refuses first)."""
    if ON_CUDA and not torch.cuda.is_available():
        reason = (
            f"no CUDA device visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); set MULTIHEAD_GPU_CHECK_DEVICE=cpu to try the checks on CPU"
        )
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_report_header(config):
    name = torch.cuda.get_device_name(DEVICE) if ON_CUDA and torch.cuda.is_available() else ""
    return f"multihead GPU check: device {DEVICE} {name}, torch {torch.__version__}"


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# Relative error budgets against the float64 oracle: (Frobenius norm of the error / norm of
# the oracle, largest error / largest |oracle| entry). The inputs' own rounding is shared
# with the oracle; what is left is the kernel's arithmetic and the rounding of its result.
_FORWARD = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (1.5e-2, 6e-2),
    torch.float16: (3e-3, 1.5e-2),
}
_GRAD = {  # gradients sum over more terms, and fused kernels round P and dS to the dtype
    torch.float64: (1e-9, 1e-8),
    torch.float32: (5e-5, 5e-4),
    torch.bfloat16: (3e-2, 1e-1),
    torch.float16: (6e-3, 3e-2),
}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, *, grad=False, what=""):
    """``actual`` (any device, any dtype) against the float64 oracle ``expected``."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values where the oracle has none"
    fro_tol, max_tol = (_GRAD if grad else _FORWARD)[dtype]
    error = actual - expected
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if scale == 0.0:
        assert float(error.abs().max(initial=0.0)) == 0.0, f"{what}: the oracle is all 0"
        return
    fro = float(error.norm() / expected.norm())
    worst = float(error.abs().max()) / scale
    assert fro <= fro_tol and worst <= max_tol, (
        f"{what} ({DTYPE_IDS.get(dtype, dtype)}): relative error {fro:.2e} (budget {fro_tol:.0e}), "
        f"largest error {worst:.2e} of the largest entry (budget {max_tol:.0e})"
    )


def randn(*shape: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Drawn on the CPU in float64 (the same numbers on every device), rounded to ``dtype``."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def oracle(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ · scale + bias) V written out, with no library code: float64 on the CPU.

    ``allowed``: bool broadcastable to (batch, heads, q_len, k_len), True = may attend.
    Key/value heads are repeated for their query group. A row with no visible key gets
    weights 0 and output 0. Differentiable with respect to float64 leaves. Returns
    (output, weights).
    """
    query, key, value = (t.to("cpu", torch.float64) for t in (query, key, value))
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scale
    if bias is not None:
        scores = scores + bias.to("cpu", torch.float64)
    if allowed is not None:
        scores = scores.masked_fill(~allowed.to("cpu"), -math.inf)
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # softmax is shift-invariant
    exp = torch.exp(scores - row_max)  # exactly 0 where the score is -inf
    total = exp.sum(-1, keepdim=True)
    weights = torch.where(total > 0, exp / torch.where(total > 0, total, 1.0), 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", weights, value), weights


def leaf64(t: Tensor) -> Tensor:
    """A float64 CPU leaf with the values of ``t`` (its rounding kept), requiring grad."""
    return t.detach().to("cpu", torch.float64).requires_grad_(True)
