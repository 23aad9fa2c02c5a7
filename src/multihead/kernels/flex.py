"""torch's FlexAttention: structured masks and score mods in one compiled, fused kernel.

Off the CPU this is what ``auto`` runs for a structured mask or a score mod: the kernel is
generated once per shape (then once for dynamic shapes) and skips the blocks our `Mask`
leaves empty, with no Python loop over tiles. Its `BlockMask` is made from the mask's own
block structure (`Mask.block_structure`, O(tiles)) and kept on the mask, so a layer stack
builds it once. On the CPU it can be asked for (``kernel="flex"``, inference only: torch
has no CPU backward for it) but ``auto`` leaves it there, for two measured reasons: its
first call for a shape compiles for several seconds, and the tiled kernel, which needs no
compiler, ran faster (benchmarks/bench_flex.py). Inside a ``torch.compile`` region it is
what ``auto`` runs where the tiled kernel would (the tiled kernel plans on the host).

The library's guarantees hold here as in the other kernels: a row that sees no key gives
0; a NaN/inf query row gives a NaN row; a NaN key gives NaN exactly the rows that see it.
The fused kernel is not trusted with NaN (it drops a NaN score inside a partly masked
block): NaN keys are zeroed, and a score mod marks their scores with a huge finite value
so that the rows which see one show it in their log-sum-exp (a value Flex returns anyway;
on the CPU, where it does not, in an extra value column that flags the NaN keys).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import masks as masks_lib
from ..masks import Mask
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

NAME = "flex"
BLOCK = 128  # FlexAttention's default block, both sides
# The score given to a NaN key's entries: a row that sees one has a log-sum-exp at least
# this large, and no real score comes near it (fp32 holds up to 3.4e38).
NAN_KEY_SCORE = 1e30


@functools.cache
def _compiled(dynamic: bool | None):
    """FlexAttention compiled (lazily: importing this module compiles nothing)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def _flex_call(device: torch.device):
    """Flex as called here: traced as it is inside a compiled region; else compiled once
    per shape on the CPU (torch 2.13's CPU template fails to build for dynamic shapes),
    and elsewhere once per shape, then once for all shapes (a decoding loop's growing
    keys do not recompile at every step)."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    return _compiled(False if device.type == "cpu" else None)


def unsupported(request: Request) -> str | None:
    """Why FlexAttention cannot serve this request, or None if it can."""
    if request.return_weights:
        return "it does not return attention weights"
    if request.dropout_p > 0.0:
        return "it has no dropout"
    mod_tensors = request.score_mod.tensors if request.score_mod is not None else ()
    if request.query.device.type == "cpu" and needs_grad(
        request.query, request.key, request.value, request.bias, *mod_tensors
    ):
        return f"torch {torch.__version__.split('+')[0]} has no FlexAttention backward on the CPU"
    if request.query.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"it does not take {request.query.dtype}"
    return None


def _wanted(request: Request) -> bool:
    """A structured mask other than plain causal, or a score mod: what Flex is for."""
    return request.score_mod is not None or (
        request.structured is not None and not request.is_causal
    )


def preferred(request: Request) -> str | None:
    """Why ``auto`` should run Flex before the others, or None."""
    if unsupported(request) is not None or not _wanted(request):
        return None
    if request.query.device.type != "cpu":
        return (
            f"on {request.query.device.type} a structured mask or score mod runs in "
            "FlexAttention's fused kernel, with no Python loop over tiles"
        )
    if torch.compiler.is_compiling() and _long_or_costly(request):
        return (
            "inside torch.compile Flex compiles with the graph (the tiled kernel plans on the host)"
        )
    return None


def _long_or_costly(request: Request) -> bool:
    """Where the tiled kernel would be worth it: a long masked sequence, or a score mod
    whose score matrix is large (the thresholds are the tiled kernel's)."""
    from . import tiled

    if (
        request.score_mod is not None
        and tiled.score_matrix_bytes(request) > tiled.SCORE_MATRIX_BUDGET
    ):
        return True
    return request.structured is not None and request.k_len >= tiled.PREFER_MIN_KEYS


def auto_declines(request: Request) -> str | None:
    """Why ``auto`` does not run Flex for a request it supports, for `explain`."""
    if unsupported(request) is not None or preferred(request) is not None:
        return None
    if request.query.device.type == "cpu":
        return (
            "auto leaves it on the CPU: each new shape compiles for seconds, torch has no "
            "CPU backward for it, and the tiled kernel measured faster"
        )
    return "a dense or plain causal mask runs faster in SDPA"


def block_mask(mask: Mask, device: torch.device):
    """The `BlockMask` of ``mask`` on ``device``, made from its block structure and kept on
    the mask (one per device)."""
    from torch.nn.attention.flex_attention import BlockMask

    key = ("flex", str(device))
    if key in mask._cache:
        return mask._cache[key]
    if torch.compiler.is_compiling():  # no host work in a graph: Flex evaluates the mask
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(
            mask.mask_mod, mask.batch, mask.heads, mask.q_len, mask.k_len, device=device
        )
    structure = mask.block_structure(BLOCK, BLOCK)  # (B|1, H|1, n_q, n_k), on the CPU

    def ordered(kind: int) -> tuple[Tensor, Tensor]:
        chosen = structure == kind
        # The chosen blocks' indices first, in key order (a stable sort of "not chosen").
        indices = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices
        return chosen.sum(-1).to(torch.int32), indices.to(torch.int32)

    partial, full = ordered(masks_lib.PARTIAL), ordered(masks_lib.FULL)
    made = BlockMask.from_kv_blocks(
        partial[0].to(device),
        partial[1].to(device),
        full[0].to(device),
        full[1].to(device),
        BLOCK_SIZE=BLOCK,
        mask_mod=mask.mask_mod,
        seq_lengths=(mask.q_len, mask.k_len),
    )
    mask._cache[key] = made
    return made


def _bool_bias_mask(bias: Tensor, q_len: int, k_len: int) -> Mask:
    """A boolean tensor mask (batch|1, heads|1, q_len, k_len) as a `Mask`."""
    bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
    batch, heads = bias.shape[0], bias.shape[1]

    def from_tensor(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return bias[b % batch, h % heads, q, k]

    return masks_lib.from_function(
        from_tensor,
        q_len,
        k_len,
        batch=batch if batch > 1 else None,
        heads=heads if heads > 1 else None,
    )


def forward(request: Request) -> tuple[Tensor, None]:
    query, key, value = request.query, request.key, request.value
    heads, kv_heads = request.num_heads, request.num_kv_heads
    group = heads // kv_heads
    structured, bias = request.structured, request.bias
    float_bias = bias if bias is not None and bias.dtype != torch.bool else None
    if bias is not None and float_bias is None:
        dense = _bool_bias_mask(bias, request.q_len, request.k_len)
        structured = dense if structured is None else structured & dense
    grad = needs_grad(query, key, value, bias)

    broken_keys = nan_keys(key)  # (batch, kv_heads, k_len)
    broken = bad_queries(query)
    if float_bias is not None:  # NaN + bias is NaN: every row sees a NaN key, as in SDPA
        broken = broken | rows_seeing(broken_keys, float_bias, heads)
    key = clean_keys(key)
    if grad:
        query = clean_queries(query)
    user_mod = request.score_mod
    if float_bias is not None:
        float_bias = float_bias.reshape((1,) * (4 - float_bias.ndim) + tuple(float_bias.shape))
    bias_batch, bias_heads = (1, 1) if float_bias is None else float_bias.shape[:2]

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if user_mod is not None:
            score = user_mod(score, b, h, q, k)
        if float_bias is not None:
            score = score + float_bias[b % bias_batch, h % bias_heads, q, k].to(score.dtype)
        marked = broken_keys[b, h // group, k]
        return torch.where(marked, torch.full_like(score, NAN_KEY_SCORE), score)

    mask = None if structured is None else block_mask(structured, query.device)
    # A row that sees a marked key puts all its weight on marked keys. Flex gives the
    # log-sum-exp off the CPU; on the CPU (no lse there) a value column flags the keys.
    lse_known = query.device.type != "cpu"
    if not lse_known:
        value = torch.cat([value, broken_keys.unsqueeze(-1).to(value.dtype)], dim=-1)
    result = _flex_call(query.device)(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=mask,
        scale=request.scale,
        enable_gqa=group != 1,
        return_lse=lse_known,
    )
    if lse_known:
        output, lse = result
        broken = broken | (lse >= NAN_KEY_SCORE / 2)
    else:
        output = result[..., :-1]
        broken = broken | (result[..., -1] > 0.5)
    return nan_rows(output, broken, in_place=not grad and lse_known), None


def explain(request: Request) -> str:
    parts = []
    if request.structured is not None:
        parts.append(f"mask {request.structured.name} as a BlockMask of {BLOCK}-blocks")
    if request.bias is not None:
        parts.append("a tensor mask read in the kernel")
    if request.score_mod is not None:
        parts.append(f"score mod {request.score_mod.name} fused")
    what = ", ".join(parts) or "no mask"
    return f"flex: torch FlexAttention (compiled), {what}"


__all__ = ["BLOCK", "NAME", "block_mask", "explain", "forward", "preferred", "unsupported"]
