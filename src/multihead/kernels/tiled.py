"""Tiled attention: the online-softmax engine as a kernel, memory linear in length.

The score matrix is never built (see `online_softmax`): the mask's empty tiles are skipped
(causal does half the work, a sliding window O(N·w), packed documents the sum of their
squares), full ones run without a mask, and a score mod (ALiBi, T5's bias, soft-capping)
is applied tile by tile, forward and backward. The backward pass recomputes each span
from the saved log-sum-exp, so training memory stays linear too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..masks import Mask
from ..score_mods import ScoreMod, as_score_mod, chain
from ..score_mods import softcap as softcap_mod
from . import online_softmax as engine
from .base import (
    Request,
    bad_queries,
    clean_keys,
    clean_queries,
    nan_keys,
    nan_rows,
    needs_grad,
    rows_seeing,
)
from .online_softmax import Dropout, Plan

NAME = "tiled"


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        plan: Plan,
        scale: float,
        score_mod: ScoreMod | None,
        dropout: Dropout | None,
        broken: Tensor,
        key_flags: Tensor | None,
        *mod_tensors: Tensor,
    ) -> tuple[Tensor, Tensor]:
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
        batch, heads, q_len = query.shape[:3]
        # Rows that no span visits stay 0; when every row is visited, nothing need be cleared.
        new = torch.empty if all(rows.spans for rows in plan.rows) else torch.zeros
        out = new(batch, heads, q_len, value.shape[-1], dtype=compute, device=query.device)
        lse = query.new_full((batch, heads, q_len, 1), -torch.inf, dtype=compute)
        flagged = None
        if key_flags is not None:  # the rows that see a NaN key, found span by span
            flagged = (key_flags, torch.zeros_like(broken))
        engine.attend_rows(query, key, value, plan, out, lse, score_mod, scale, dropout, flagged)
        if flagged is not None:
            broken = broken | flagged[1]
        # A NaN row passes no gradient: the backward sees it as a row that saw no key.
        lse.masked_fill_(broken.unsqueeze(-1), -torch.inf)
        output = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.plan, ctx.scale, ctx.score_mod, ctx.dropout = plan, scale, score_mod, dropout
        in_place = not any(ctx.needs_input_grad[:3])  # else the backward reads the output
        return nan_rows(output, broken, in_place), nan_rows(lse, broken, False).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_lse: Tensor):
        query, key, value, output, lse = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        plan, score_mod, scale, dropout = ctx.plan, ctx.score_mod, ctx.scale, ctx.dropout
        inputs = (query, key, value)
        spans = plan.rows[0].spans if len(plan.rows) == 1 else ()
        if len(spans) == 1 and (spans[0].k0, spans[0].k1) == (0, key.shape[2]):
            # One call did the forward: its backward gives the gradients directly, with no
            # accumulators beside them (at N = 16384, 0.4 GB less).
            heads, kv_heads = query.shape[1], key.shape[1]
            expanded = (engine.expand_heads(key, heads), engine.expand_heads(value, heads))
            tiles = engine.tiles_of(query, *expanded, plan, plan.rows[0], score_mod, scale, dropout)
            d_q, d_k, d_v, mod_grads = engine.tile_backward(next(tiles), grad_output, output, lse)
            d_k, d_v = engine.sum_groups(d_k, kv_heads), engine.sum_groups(d_v, kv_heads)
            grads = tuple(g.to(x.dtype) for g, x in zip((d_q, d_k, d_v), inputs, strict=True))
            mod_grads = mod_grads or (None,) * (len(score_mod.tensors) if score_mod else 0)
            return (*grads, None, None, None, None, None, None, *mod_grads)
        compute = lse.dtype
        accumulators = tuple(torch.zeros(x.shape, dtype=compute, device=x.device) for x in inputs)
        mod_grads = engine.accumulate_gradients(
            grad_output, query, key, value, output, lse, accumulators, plan, score_mod, scale,
            dropout,
        )  # fmt: skip
        grads = tuple(g.to(x.dtype) for g, x in zip(accumulators, inputs, strict=True))
        return (*grads, None, None, None, None, None, None, *mod_grads)


def tiled_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Mask | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    score_mod: ScoreMod | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention without the N×N matrix. Returns (output, log-sum-exp (batch, heads, q_len)).

    ``mask`` is a structured `Mask` (its empty tiles are skipped); ``bias`` a dense bool mask
    or additive float bias broadcastable to (batch, heads, q_len, k_len); ``score_mod``
    changes the scores (before the mask; ``softcap`` is applied after it). Dropout draws its
    seed from torch's global generator, so ``torch.manual_seed`` makes it reproducible.
    The log-sum-exp is not differentiable. Inputs are assumed validated (see
    `multihead.attention`). Non-finite input gives NaN where the float64 reference has it
    (see kernels/base.py): the rows of a NaN/inf query, and the rows that see a NaN key.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    score_mod = chain(as_score_mod(score_mod), softcap_mod(softcap) if softcap else None)
    dropout = None
    if dropout_p > 0.0:
        dropout = Dropout(dropout_p, int(torch.randint(0, 2**62, (), dtype=torch.int64)))
    plan = Plan.build(query.shape[2], key.shape[2], mask, bias, block_q, block_k)
    broken_queries, broken_keys = bad_queries(query), nan_keys(key)
    mod_tensors = () if score_mod is None else score_mod.tensors
    grad = needs_grad(query, key, value, bias, *mod_tensors)
    hides = (mask is not None or bias is not None) and (bias is None or bias.dtype == torch.bool)
    key_flags = None
    if hides:  # a boolean mask hides keys: the spans it leaves say which rows see a NaN key
        broken, key_flags = broken_queries, broken_keys
    else:  # every key is seen (a float bias is added: NaN + bias is NaN, as in the
        # reference, even where a structured mask adds -inf to it)
        broken = broken_queries | rows_seeing(broken_keys, bias, query.shape[1])
    if hides or grad:  # a fused tile adds its mask as -inf, and NaN + -inf is NaN
        key = clean_keys(key)
    if grad:  # the backward multiplies the rows a tile leaves out by 0
        query = clean_queries(query)
    return _TiledAttention.apply(
        query, key, value, plan, scale, score_mod, dropout, broken, key_flags, *mod_tensors
    )


def unsupported(request: Request) -> str | None:
    """Why the tiled kernel cannot serve this request, or None if it can."""
    if request.return_weights:
        return "it does not build the weight matrix"
    return None


# Measured (benchmarks/bench_scale.py, bench_flex.py): block skipping beats SDPA's dense-mask
# path on a long sequence once the mask leaves at most ~3/4 of the scores (a prefix-LM at
# N=8192 leaves 56% and runs 1.8x faster tiled).
PREFER_MIN_KEYS = 2048
PREFER_MAX_VISITED = 0.75
# The reference kernel (or SDPA's dense bias) builds the score matrix; past this many bytes
# the tiled one computes a score mod instead.
SCORE_MATRIX_BUDGET = 1 << 28


def score_matrix_bytes(request: Request) -> int:
    """The bytes of the request's fp32 score matrix, which the other kernels would build."""
    batch, heads = request.query.shape[:2]
    return batch * heads * request.q_len * request.k_len * 4


def plan_for(request: Request) -> Plan:
    """The plan the kernel would run for ``request`` (its spans and work fraction)."""
    return Plan.build(request.q_len, request.k_len, request.structured, request.bias)


def preferred(request: Request) -> str | None:
    """Why ``auto`` should run this kernel before the others, or None."""
    if unsupported(request) is not None or torch.compiler.is_compiling():
        return None  # its plan is made on the host: inside a compiled graph, Flex serves
    if request.query.device.type != "cpu":
        # Measured on an H200 (gpu_tests, bench_gpu.py): off the CPU a span runs written-out
        # steps, and SDPA with the dense mask was 50x faster for a window of 256 at N=4096;
        # FlexAttention takes structured masks and score mods there.
        return None
    score_bytes = score_matrix_bytes(request)
    if request.score_mod is not None and score_bytes > SCORE_MATRIX_BUDGET:
        return f"the score mod would need a {score_bytes / 2**30:.1f} GiB score matrix"
    if request.is_causal or request.structured is None or request.k_len < PREFER_MIN_KEYS:
        return None
    if plan_for(request).fraction <= PREFER_MAX_VISITED:
        return "the mask is sparse enough for block skipping to beat a dense mask"
    return None


def forward(request: Request) -> tuple[Tensor, None]:
    output, _ = tiled_attention(
        request.query,
        request.key,
        request.value,
        mask=request.structured,
        bias=request.bias,
        scale=request.scale,
        score_mod=request.score_mod,
        dropout_p=request.dropout_p,
    )
    return output, None


def explain(request: Request) -> str:
    plan = plan_for(request)
    calls = sum(len(rows.spans) for rows in plan.rows)
    return (
        f"tiled: online softmax in {calls} spans over {len(plan.rows)} row blocks, "
        f"memory linear in length, computes {plan.fraction:.0%} of the scores"
    )
