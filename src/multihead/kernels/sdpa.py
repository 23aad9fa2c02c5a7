"""torch's fused scaled_dot_product_attention: the fast path when no weights are needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    Request,
    bad_queries,
    causal_rows_seeing,
    combine_masks,
    nan_keys,
    nan_rows,
    needs_grad,
    rows_broken_without_mask,
    rows_seeing,
    zero_rows,
)
from .reference import causal_mask, score_indices

NAME = "sdpa"
# Devices whose fused kernels give a row that sees no key output 0 and gradients 0 (checked
# by tests/ on the CPU; gpu_tests/ found CUDA's do not, in fp16/bf16, torch 2.11).
ZEROES_EMPTY_ROWS = {"cpu"}


def unsupported(request: Request) -> str | None:
    """Why SDPA cannot serve this request, or None if it can."""
    if request.return_weights:
        return "it does not return attention weights"
    mod = request.score_mod
    if mod is not None and not mod.additive:
        return f"it takes no score mod other than an added bias ({mod.name})"
    return None


def preferred(request: Request) -> str | None:
    """SDPA is the default choice, never preferred over the others' reasons."""
    return None


def forward(request: Request) -> tuple[Tensor, None]:
    """SDPA's output, with NaN rows where the float64 reference has them (see base.py):
    a query row holding NaN/inf, or one whose visible keys include a NaN key."""
    query, key, mask, heads = request.query, request.key, request.mask, request.num_heads
    grad = needs_grad(query, key, request.value, mask)
    if mask is None and request.dropout_p == 0.0 and not grad:  # inference, no mask tensor
        # SDPA runs on the inputs as they are: its causal fast path hides a NaN key from the
        # rows before it (tests/test_reliability_inputs.py). Only the rows that it turns
        # into 0 are made NaN, in place, in the layout SDPA wrote (see nan_rows).
        output = _attend(request, query, key)
        return nan_rows(output, rows_broken_without_mask(query, key), in_place=True), None
    broken_queries, broken_keys = bad_queries(query), nan_keys(key)
    if request.is_causal:
        broken = broken_queries | causal_rows_seeing(broken_keys, request.q_len, heads)
    else:
        broken = broken_queries | rows_seeing(broken_keys, mask, heads)
    # SDPA adds a mask (and, under dropout, the causal one) as -inf, and NaN + -inf is NaN;
    # its backward multiplies the entries it leaves out by 0: either would carry a NaN key
    # to other rows, and the backward a NaN query too. So the flagged rows are zeroed, in
    # contiguous copies (see zero_rows: SDPA runs faster on them than on strided heads).
    key = zero_rows(key, broken_keys)
    if grad:
        query = zero_rows(query, broken_queries)
    if mask is None or query.device.type in ZEROES_EMPTY_ROWS:
        output = _attend(request, query, key)
    else:
        # The CPU kernel returns 0 for a row that sees no key, with gradients 0; the CUDA
        # ones do not (fp16/bf16, torch 2.11: the mean of the values, and NaN in d_query).
        # Such a row is run over every key instead, then set to 0, which stops its gradient.
        visible = mask if mask.dtype == torch.bool else mask > -torch.inf
        empty = ~visible.any(-1, keepdim=True)
        opened = mask | empty if mask.dtype == torch.bool else mask.masked_fill(empty, 0.0)
        output = _attend(request, query, key, opened).masked_fill(empty, 0.0)
    return nan_rows(output, broken, in_place=not grad), None  # the backward reads output


def _attend(request: Request, query: Tensor, key: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA on the request, under ``mask`` when given (else the request's own)."""
    mask = request.mask if mask is None else mask
    is_causal = request.is_causal
    if request.score_mod is not None:  # an additive score mod, as a dense bias
        shape = torch.Size((1, request.num_heads, request.q_len, request.k_len))
        _, h, q, k = score_indices(shape, query.device)
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
        bias = request.score_mod.bias(h, q, k).to(compute)
        if is_causal:  # SDPA takes a mask or is_causal, not both
            mask, is_causal = causal_mask(request.q_len, request.k_len, query.device), False
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = combine_masks(mask, bias)
        else:
            mask = mask + bias
    if mask is not None and mask.dtype.is_floating_point:
        mask = mask.to(query.dtype)  # SDPA wants the bias in the query's dtype
    return F.scaled_dot_product_attention(
        query,
        key,
        request.value,
        attn_mask=mask,
        dropout_p=request.dropout_p,
        is_causal=is_causal,
        scale=request.scale,
        enable_gqa=request.num_kv_heads != request.num_heads,
    )


def explain(request: Request) -> str:
    if request.is_causal and request.score_mod is not None:
        how = "the causal mask as a dense tensor (SDPA takes a bias or is_causal, not both)"
    elif request.is_causal:
        how = "is_causal fast path (plain causal mask, no mask tensor built)"
    elif request.mask is None:
        how = "no mask"
    elif request.mask.dtype.is_floating_point:
        how = "additive float mask"
    else:
        how = "dense boolean mask"
    gqa = (
        f", grouped-query {request.num_heads}/{request.num_kv_heads} heads"
        if request.num_kv_heads != request.num_heads
        else ""
    )
    mod = f", score mod {request.score_mod.name} as a dense bias" if request.score_mod else ""
    return f"sdpa: torch.nn.functional.scaled_dot_product_attention, {how}{gqa}{mod}"
