"""`attention(query, key, value, ...)`: validate once, pick a kernel, run it.

Tensors are (batch, heads, seq, head_dim), as torch SDPA. Everything a caller can get wrong
is checked here, before any work, with a message naming the argument; kernels receive a
`Request` they can trust.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from . import masks as masks_lib
from .kernels import KERNELS, Kernel, Request, flex
from .kernels.base import bad_queries
from .masks import Mask
from .score_mods import ScoreMod, ScoreModFn, as_score_mod, chain
from .score_mods import softcap as softcap_mod

CausalArg = bool | Literal["top-left", "bottom-right"]
# Called with (request, kernel, kernel argument) by every `attention` call while not empty: a
# plain list, so the default path costs one truth test of a Python object.
OBSERVERS: list[Callable[[Request, Kernel, str], None]] = []
KernelArg = Literal["auto", "reference", "sdpa", "tiled", "flex"]

__all__ = ["attention", "check_mask", "explain", "select_kernel"]


def _check_qkv(query: object, key: object, value: object) -> tuple[Tensor, Tensor, Tensor]:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(tensor.shape)}"
            )
    assert isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but query has {query.dtype}")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device} but query is on {query.device}")
        if tensor.shape[0] != query.shape[0]:
            raise ValueError(
                f"{name} has batch size {tensor.shape[0]} but query has {query.shape[0]}"
            )
    batch, heads, _, head_dim = query.shape
    if heads == 0:
        raise ValueError("query has 0 heads; at least one is needed")
    if head_dim == 0:
        raise ValueError("query has head_dim 0; each head needs at least one feature")
    if key.shape[-1] != head_dim:
        raise ValueError(f"key has head_dim {key.shape[-1]} but query has head_dim {head_dim}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads but value has {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(
            f"key has {key.shape[2]} positions but value has {value.shape[2]}; they must match"
        )
    kv_heads = key.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"key/value have {kv_heads} heads, which must divide the query's {heads} heads "
            "(grouped-query attention)"
        )
    return query, key, value


def check_mask(mask: object, query: Tensor, key: Tensor) -> Mask | Tensor | None:
    """Check a mask against the inputs; a tensor comes back as (batch|1, heads|1, q_len, k_len)."""
    if mask is None:
        return None
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    if isinstance(mask, Mask):
        if (mask.q_len, mask.k_len) != (q_len, k_len):
            raise ValueError(
                f"mask is {mask.q_len}x{mask.k_len} (q_len x k_len) but the inputs are "
                f"{q_len}x{k_len}"
            )
        if mask.batch is not None and mask.batch != batch:
            raise ValueError(f"mask was built for batch size {mask.batch} but query has {batch}")
        if mask.heads is not None and mask.heads != heads:
            raise ValueError(f"mask was built for {mask.heads} heads but query has {heads}")
        return mask
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask must be a multihead Mask or a torch.Tensor, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(
            f"mask must be bool (True = may attend) or floating (additive bias), got {mask.dtype}"
        )
    if mask.device != query.device:
        raise ValueError(f"mask is on {mask.device} but query is on {query.device}")
    if mask.ndim == 2:
        mask = mask.view(1, 1, *mask.shape)
    if mask.ndim != 4:
        raise ValueError(
            "mask must be 2-D (q_len, k_len) or 4-D (batch|1, heads|1, q_len, k_len), "
            f"got shape {tuple(mask.shape)}"
        )
    expected = (batch, heads, q_len, k_len)
    ok = (
        mask.shape[0] in (1, batch)
        and mask.shape[1] in (1, heads)
        and tuple(mask.shape[2:]) == (q_len, k_len)
    )
    if not ok:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, which is not broadcastable to "
            f"(batch, heads, q_len, k_len) = {expected} without guessing"
        )
    return mask


def _check_finite(request: Request) -> None:
    """Refuse NaN/inf in query, key, value, and NaN/+inf in a float mask (-inf is "blocked")."""
    for name, tensor in (
        ("query", request.query),
        ("key", request.key),
        ("value", request.value),
        ("mask", request.bias),
    ):
        if tensor is None or not tensor.dtype.is_floating_point:
            continue
        if bool(tensor.sum().isfinite()):  # one fast reduction: the common, clean case
            continue
        bad = tensor.isnan() | (tensor == torch.inf) if name == "mask" else ~tensor.isfinite()
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            what = "NaN or +inf (-inf, blocked, is fine)" if name == "mask" else "NaN or inf"
            raise ValueError(
                f"{name} has {int(bad.sum())} values that are {what}, the first at index "
                f"{first} (check_finite=True)"
            )


def _causal_alignment(causal: object) -> str | None:
    if causal is False or causal is None:
        return None
    if causal is True:
        return "top-left"
    if causal in masks_lib.ALIGNMENTS:
        return str(causal)
    raise ValueError(f"causal must be True, False, 'top-left' or 'bottom-right', got {causal!r}")


def _is_positive_number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


def _request(
    query: object,
    key: object,
    value: object,
    mask: object,
    causal: object,
    scale: object,
    dropout_p: object,
    softcap: object,
    return_weights: bool,
    check_finite: object = False,
    score_mod: object = None,
) -> Request:
    query, key, value = _check_qkv(query, key, value)
    checked = check_mask(mask, query, key)
    structured = checked if isinstance(checked, Mask) else None
    bias = checked if isinstance(checked, Tensor) else None
    align = _causal_alignment(causal)
    if scale is not None and not _is_positive_number(scale):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, int | float)
        or not 0.0 <= dropout_p < 1.0
    ):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if softcap is not None and not _is_positive_number(softcap):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")

    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = False
    # Bottom-right equals top-left when the lengths agree.
    if align == "bottom-right" and q_len == k_len:
        align = "top-left"
    # One new query after a cache sees every key: its causal mask is all True, so build none.
    if align == "bottom-right" and q_len == 1:
        align = None
    if align is not None:
        causal_mask = masks_lib.causal(q_len, k_len, align=align)
        # A plain top-left causal mask is SDPA's fast path: no mask tensor is built.
        is_causal = structured is None and bias is None and align == "top-left"
        structured = causal_mask if structured is None else structured & causal_mask
    request = Request(
        query=query,
        key=key,
        value=value,
        structured=structured,
        bias=bias,
        is_causal=is_causal,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1]),
        dropout_p=float(dropout_p),
        score_mod=chain(
            as_score_mod(score_mod),  # type: ignore[arg-type]
            softcap_mod(float(softcap)) if softcap is not None else None,
        ),
        return_weights=return_weights,
    )
    if check_finite:
        _check_finite(request)
    return request


def select_kernel(request: Request, kernel: str = "auto") -> Kernel:
    """The kernel that will run ``request``; raises if an explicit choice cannot."""
    if kernel == "auto":
        for module in KERNELS.values():
            if module.preferred(request) is not None:
                return module
        for module in KERNELS.values():
            if module.unsupported(request) is None:
                return module
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {sorted(KERNELS)}, got {kernel!r}")
    module = KERNELS[kernel]
    reason = module.unsupported(request)
    if reason is not None:
        raise ValueError(f"kernel {kernel!r} cannot run this call: {reason}")
    return module


@overload
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    softcap: float | None = ...,
    score_mod: ScoreModFn | ScoreMod | None = ...,
    return_weights: Literal[False] = ...,
    kernel: KernelArg = ...,
    check_finite: bool = ...,
) -> Tensor: ...


@overload
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Mask | Tensor | None = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    softcap: float | None = ...,
    score_mod: ScoreModFn | ScoreMod | None = ...,
    return_weights: Literal[True],
    kernel: KernelArg = ...,
    check_finite: bool = ...,
) -> tuple[Tensor, Tensor]: ...


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    causal: CausalArg = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    score_mod: ScoreModFn | ScoreMod | None = None,
    return_weights: bool = False,
    kernel: KernelArg = "auto",
    check_finite: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head scaled dot-product attention: softmax(Q Kᵀ · scale) V per head.

    Args:
        query: (batch, heads, q_len, head_dim).
        key, value: (batch, kv_heads, k_len, head_dim / value_dim); kv_heads divides
            heads (grouped-query attention; no copies are made).
        mask: a `Mask`, or a tensor broadcastable to (batch, heads, q_len, k_len):
            bool True = may attend, or float = additive bias.
        causal: True / "top-left" (query i sees keys 0..i) or "bottom-right" (the last
            query sees every key: decoding after a cache). Combined with ``mask``.
        scale: score scale, default 1/sqrt(head_dim).
        dropout_p: dropout on the attention weights (pass 0 at evaluation).
        softcap: if set, scores become softcap·tanh(scores/softcap) (after ``score_mod``).
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, applied
            to the scaled scores before the mask: a plain function, or a `ScoreMod` from
            `multihead.score_mods` (ALiBi, T5's relative bias, soft-capping), which the tiled
            kernel computes per tile, so no N×N bias is built.
        return_weights: also return the weights (batch, heads, q_len, k_len).
        kernel: "auto" (fastest that supports the call), "sdpa", "reference", "tiled" or
            "flex" (torch's FlexAttention, compiled; inference only on the CPU).
        check_finite: first scan the inputs and raise ValueError, naming the argument, if
            query, key or value hold NaN/inf or a float mask holds NaN/+inf. Off by default:
            the scan costs a pass over the inputs and a host sync.

    A query with no visible key gets output 0 and weights 0 (never NaN). Without
    ``check_finite``, non-finite inputs are not refused, and they show in the output as in
    the float64 reference, in every kernel: a NaN/inf in a query row makes that output row
    NaN; a NaN in a key makes NaN every row that sees it (a boolean or causal mask hides
    it; a float mask, being added, does not), even when it is the row's only key; a NaN in
    a value reaches the outputs that see it (in the reference, whose zero weights multiply
    it too, its whole column). This costs a sum over each query row and, with a mask or
    autograd, each key row: tensor ops, no host sync. The training loop's non-finite guard
    stops (or skips) on what follows.
    """
    request = _request(
        query, key, value, mask, causal, scale, dropout_p, softcap, return_weights, check_finite,
        score_mod,
    )  # fmt: skip
    chosen = select_kernel(request, kernel)  # validates ``kernel`` even when keys are empty
    for observer in OBSERVERS:  # empty unless `multihead.report.explain_module` is running
        observer(request, chosen, kernel)
    if request.k_len == 0:  # nothing to attend to: every row is fully masked
        query = request.query
        broken = bad_queries(query).unsqueeze(-1)  # but a NaN/inf query row stays NaN
        output = query.new_zeros(*query.shape[:3], request.value.shape[-1])
        output = output.masked_fill(broken, math.nan)
        weights = query.new_zeros(*query.shape[:3], 0)
    else:
        output, weights = chosen.forward(request)
    if return_weights:
        assert weights is not None
        return output, weights
    return output


def explain(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    causal: CausalArg = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    score_mod: ScoreModFn | ScoreMod | None = None,
    return_weights: bool = False,
    kernel: KernelArg = "auto",
    check_finite: bool = False,
) -> str:
    """One line: which kernel `attention` runs for these arguments, and why."""
    request = _request(
        query, key, value, mask, causal, scale, dropout_p, softcap, return_weights, check_finite,
        score_mod,
    )  # fmt: skip
    return explain_request(request, select_kernel(request, kernel), kernel)


def explain_request(request: Request, chosen: Kernel, kernel: str = "auto") -> str:
    """`explain`'s line for a validated request and the kernel chosen for it."""
    if request.k_len == 0:
        return "none: the keys are empty, so the output is zeros"
    line = chosen.explain(request)
    reason = chosen.preferred(request) if kernel == "auto" else None
    if reason is not None:
        line += f", chosen because {reason}"
    elif kernel == "auto":
        skipped = [
            f"{name} skipped: {module.unsupported(request)}"
            for name, module in KERNELS.items()
            if module is not chosen and module.unsupported(request) is not None
        ]
        declined = flex.auto_declines(request) if chosen is not flex else None
        if declined is not None:
            skipped.append(f"flex not chosen: {declined}")
        if skipped:
            line += " [" + "; ".join(skipped) + "]"
    return line
