"""Tiled attention: online softmax over key blocks, memory linear in sequence length.

The score matrix is never built. For each block of queries the kernel walks the key
blocks; each tile gives a partial output and its log-sum-exp, and partial results merge
exactly: out = Σ_j exp(lse_j − lse)·out_j with lse = log Σ_j exp(lse_j) (Milakov &
Gimelshein 2018; Dao et al. 2022). The mask's block structure says which tiles are empty
(skipped: causal does half the work, a sliding window O(N·w)) and which are full (no mask
applied). The backward pass recomputes each tile from the saved log-sum-exp, so training
memory stays linear too.

A tile runs torch's fused CPU flash kernel when it can (no soft-capping, CPU, fp32/bf16/fp16)
and the same steps written out in torch otherwise (float64, soft-capping, other devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import EMPTY, FULL, Mask
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

NAME = "tiled"
BLOCK_Q = 256
BLOCK_K = 256
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Tiling:
    """How the (q_len × k_len) plane is cut, and what the mask leaves of each tile."""

    block_q: int
    block_k: int
    mask: Mask | None  # the structured mask, evaluated per tile
    bias: Tensor | None  # dense bool mask or float bias (batch|1, heads|1, Q, K), sliced per tile
    structure: Tensor | None  # (n_q, n_k) int8: EMPTY / PARTIAL / FULL over the whole batch

    @staticmethod
    def build(
        q_len: int, k_len: int, mask: Mask | None, bias: Tensor | None, block_q: int, block_k: int
    ) -> Tiling:
        structure = None
        if mask is not None:
            per_batch = mask.block_structure(block_q, block_k)
            # A tile is skipped only if it is empty for every batch element.
            structure = torch.where(
                (per_batch == EMPTY).all(0),
                EMPTY,
                torch.where((per_batch == FULL).all(0), FULL, 1),
            ).to(torch.int8)
        return Tiling(block_q, block_k, mask, bias, structure)

    def key_blocks(self, i: int, n_k: int) -> list[int]:
        """Key blocks that query block ``i`` must visit."""
        if self.structure is None:
            return list(range(n_k))
        return [j for j in range(n_k) if int(self.structure[i, j]) != EMPTY]

    def full(self, i: int, j: int) -> bool:
        """Whether the mask leaves tile (i, j) whole, so that no mask need be applied."""
        return self.mask is None or (self.structure is not None and self.structure[i, j] == FULL)

    def spans(
        self, i: int, k_blocks: list[tuple[int, int]], merge: bool
    ) -> list[tuple[int, int, int | None]]:
        """The key ranges query block ``i`` visits, as (k0, k1, tile column or None).

        With ``merge``, each run of consecutive full blocks becomes one range (column None,
        no mask): one fused call over many keys costs less than a call and a merge per
        block. Blocks the mask cuts keep their own range and column.
        """
        spans: list[tuple[int, int, int | None]] = []
        for j in self.key_blocks(i, len(k_blocks)):
            k0, k1 = k_blocks[j]
            if not (merge and self.full(i, j)):
                spans.append((k0, k1, j))
            elif spans and spans[-1][2] is None and spans[-1][1] == k0:
                spans[-1] = (spans[-1][0], k1, None)
            else:
                spans.append((k0, k1, None))
        return spans

    def allowed(
        self, i: int, j: int | None, q0: int, q1: int, k0: int, k1: int, device: torch.device
    ) -> Tensor | None:
        """Boolean (batch|1, 1, bq, bk) tile of the structured mask, or None when full
        (``j`` None: a merged run of full tiles)."""
        if j is None or self.full(i, j):
            return None
        assert self.mask is not None
        b, q, k = self.mask._indices(q0, q1, k0, k1, device)
        return self.mask.mask_mod(b, q, k).unsqueeze(1)


def _tile_mask(tiling: Tiling, i: int, j: int | None, q0: int, q1: int, k0: int, k1: int, device):
    """The tile's mask: None, bool (True = may attend) or float bias; (B|1, H|1, bq, bk)."""
    allowed = tiling.allowed(i, j, q0, q1, k0, k1, device)
    bias = None if tiling.bias is None else tiling.bias[..., q0:q1, k0:k1]
    if bias is None or allowed is None:
        return allowed if bias is None else bias
    if bias.dtype == torch.bool:
        return bias & allowed
    return bias.masked_fill(~allowed, -torch.inf)


def _as_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The fused kernel wants an additive mask in the query's dtype."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -torch.inf)


def _empty_rows(mask: Tensor | None) -> Tensor | None:
    """(B|1, H|1, bq, 1): rows of the tile where no key is visible."""
    if mask is None:
        return None
    visible = mask if mask.dtype == torch.bool else mask > -torch.inf
    return ~visible.any(-1, keepdim=True)


def _expand_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, kv_heads, n, d) → (B, heads, n, d): each key/value head serves its query group."""
    if x.shape[1] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, softcap: float | None):
    """Tile scores in the compute dtype after soft-capping and masking, and tanh for backward."""
    scores = (q * scale) @ k.transpose(-2, -1)
    capped = None
    if softcap is not None:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -torch.inf)
        else:
            scores = scores + mask.to(scores.dtype)
    return scores, capped


def _use_fused(
    query: Tensor, value: Tensor, softcap: float | None, dropout: Dropout | None
) -> bool:
    return (
        _FUSED is not None
        and query.shape[-1] == value.shape[-1]
        and softcap is None
        and dropout is None
        and query.device.type == "cpu"
        and query.dtype in _FUSED_DTYPES
    )


@dataclass(frozen=True)
class Dropout:
    """Attention dropout that the backward pass can replay: each tile's keep-mask is drawn
    from a generator seeded with (seed, tile), so nothing N×N is stored."""

    p: float
    seed: int

    def keep(self, shape: torch.Size, tile: int, device: torch.device) -> Tensor:
        generator = torch.Generator(device=device).manual_seed(self.seed + tile)
        return torch.rand(shape, generator=generator, device=device) >= self.p


def _tile_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    softcap: float | None,
    dropout: Dropout | None = None,
    tile: int = 0,
) -> tuple[Tensor, Tensor]:
    """One tile: (partial output (B,H,bq,Dv), log-sum-exp (B,H,bq,1)), both in fp32 or fp64."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if _use_fused(q, v, softcap, dropout):
        out, lse = _FUSED(q, k, v, attn_mask=_as_bias(mask, q.dtype), scale=scale)
        lse = lse.unsqueeze(-1).to(compute)
        empty = _empty_rows(mask)
        if empty is not None:  # the fused kernel reports lse 0 for rows it could not see
            lse = lse.masked_fill(empty, -torch.inf)
        return out.to(compute), lse
    scores, _ = _scores(q.to(compute), k.to(compute), mask, scale, softcap)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.exp(scores - lse.masked_fill(lse == -torch.inf, 0.0))
    if dropout is not None:
        p = p * dropout.keep(p.shape, tile, p.device) / (1.0 - dropout.p)
    return p @ v.to(compute), lse


def _tile_backward(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
    softcap: float | None,
    dropout: Dropout | None = None,
    tile: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one tile given the final output and log-sum-exp of its query rows.

    With the global ``lse`` the tile's probabilities are exactly its slice of the softmax,
    and delta = rowsum(dO ∘ O) uses the global output, so the tiles' gradients add up.
    Rows that saw no key carry lse = +inf here, which makes their probabilities 0.
    """
    safe_lse = lse.masked_fill(lse == -torch.inf, torch.inf)
    if _use_fused(q, v, softcap, dropout):
        return _FUSED_BACKWARD(
            d_out,
            q,
            k,
            v,
            out,
            safe_lse.squeeze(-1).to(torch.float32),
            0.0,
            False,
            attn_mask=_as_bias(mask, q.dtype),
            scale=scale,
        )
    compute = safe_lse.dtype
    q, k, v, d_out, out = (x.to(compute) for x in (q, k, v, d_out, out))
    scores, capped = _scores(q, k, mask, scale, softcap)
    p = torch.exp(scores - safe_lse)
    d_p = d_out @ v.transpose(-2, -1)
    if dropout is None:
        d_v = p.transpose(-2, -1) @ d_out
    else:  # O = (P ∘ keep / (1-p)) V: the same keep-mask scales both paths
        kept = dropout.keep(p.shape, tile, p.device) / (1.0 - dropout.p)
        d_v = (p * kept).transpose(-2, -1) @ d_out
        d_p = d_p * kept
    d_s = p * (d_p - (d_out * out).sum(-1, keepdim=True))
    if capped is not None:
        d_s = d_s * (1.0 - capped * capped)
    d_s = d_s * scale
    return d_s @ k, d_s.transpose(-2, -1) @ q, d_v


def _blocks(length: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _sum_groups(grad: Tensor, num_kv_heads: int) -> Tensor:
    """(B, heads, n, d) → (B, kv_heads, n, d): a shared key/value head gets its group's sum."""
    if grad.shape[1] == num_kv_heads:
        return grad
    return grad.unflatten(1, (num_kv_heads, -1)).sum(2)


def _merge(outs: list[Tensor], lses: list[Tensor], out: Tensor, lse: Tensor) -> None:
    """Write the merge of a row block's tile results into ``out`` and ``lse``.

    Each tile's output is softmax-normalised over its own keys; weighted by its share of the
    mass, exp(lse_j − lse) with lse = log Σ_j exp(lse_j), they sum to the exact output. Done
    once per row block (a few passes) rather than tile by tile (ten small ops per tile).
    """
    stacked = torch.stack(lses)  # (tiles, B, H, bq, 1)
    total = torch.logsumexp(stacked, dim=0)
    weights = torch.exp(stacked - total.masked_fill(total == -torch.inf, 0.0))
    lse.copy_(total)
    out.zero_()
    for tile_out, weight in zip(outs, weights, strict=True):
        out.addcmul_(tile_out, weight)


def row_tiles(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    tiling: Tiling,
    i: int,
    scale: float,
    softcap: float | None,
    dropout: Dropout | None = None,
) -> tuple[list[Tensor], list[Tensor], bool]:
    """Query block ``i`` against every key range it visits: the partial outputs and
    log-sum-exps (compute dtype), and whether they are one unmasked call over all keys
    (then they are the block's result as they stand; otherwise `_merge` them)."""
    heads = query.shape[1]
    q0, q1 = i * tiling.block_q, min((i + 1) * tiling.block_q, query.shape[2])
    k_blocks = _blocks(key.shape[2], tiling.block_k)
    spans = tiling.spans(i, k_blocks, _use_fused(query, value, softcap, dropout))
    q = query[..., q0:q1, :]
    outs, lses = [], []
    for k0, k1, j in spans:
        mask = _tile_mask(tiling, i, j, q0, q1, k0, k1, query.device)
        k = _expand_heads(key[..., k0:k1, :], heads)
        v = _expand_heads(value[..., k0:k1, :], heads)
        tile = i * len(k_blocks) + (j or 0)  # dropout never merges: j is set
        tile_out, tile_lse = _tile_forward(q, k, v, mask, scale, softcap, dropout, tile)
        outs.append(tile_out)
        lses.append(tile_lse)
    return outs, lses, len(spans) == 1 and spans[0][2] is None


def accumulate_gradients(
    grad_output: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    output: Tensor,
    lse: Tensor,
    d_query: Tensor,
    d_key: Tensor,
    d_value: Tensor,
    tiling: Tiling,
    scale: float,
    softcap: float | None,
    dropout: Dropout | None = None,
) -> None:
    """Add every visited tile's gradients to ``d_query``, ``d_key``, ``d_value`` (in lse's
    dtype; key/value gradients summed over each GQA group), in place. ``output`` and ``lse``
    are those of the query rows over all their keys, so the tiles' gradients add up."""
    heads, kv_heads = query.shape[1], key.shape[1]
    compute = lse.dtype
    merge = _use_fused(query, value, softcap, dropout)
    k_blocks = _blocks(key.shape[2], tiling.block_k)
    for i, (q0, q1) in enumerate(_blocks(query.shape[2], tiling.block_q)):
        rows = (query[..., q0:q1, :], output[..., q0:q1, :], lse[..., q0:q1, :])
        d_out = grad_output[..., q0:q1, :]
        for k0, k1, j in tiling.spans(i, k_blocks, merge):
            mask = _tile_mask(tiling, i, j, q0, q1, k0, k1, query.device)
            k = _expand_heads(key[..., k0:k1, :], heads)
            v = _expand_heads(value[..., k0:k1, :], heads)
            tile = i * len(k_blocks) + (j or 0)
            d_q, d_k, d_v = _tile_backward(
                d_out, rows[0], k, v, rows[1], rows[2], mask, scale, softcap, dropout, tile
            )
            d_query[..., q0:q1, :] += d_q
            d_key[..., k0:k1, :] += _sum_groups(d_k.to(compute), kv_heads)
            d_value[..., k0:k1, :] += _sum_groups(d_v.to(compute), kv_heads)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        tiling: Tiling,
        scale: float,
        softcap: float | None,
        dropout: Dropout | None,
        broken: Tensor,
    ) -> tuple[Tensor, Tensor]:
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
        q_blocks = _blocks(query.shape[2], tiling.block_q)
        out = query.new_zeros(*query.shape[:3], value.shape[-1], dtype=compute)
        lse = query.new_full((*query.shape[:3], 1), -torch.inf, dtype=compute)
        for i, (q0, q1) in enumerate(q_blocks):
            tile_outs, tile_lses, whole = row_tiles(
                query, key, value, tiling, i, scale, softcap, dropout
            )
            if whole:  # one unmasked call: nothing to merge
                out[..., q0:q1, :] = tile_outs[0]
                lse[..., q0:q1, :] = tile_lses[0]
            elif tile_outs:  # else no key block was visible: the rows stay 0
                _merge(tile_outs, tile_lses, out[..., q0:q1, :], lse[..., q0:q1, :])
        # A NaN row passes no gradient: the backward sees it as a row that saw no key.
        lse.masked_fill_(broken.unsqueeze(-1), -torch.inf)
        output = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.tiling, ctx.scale, ctx.softcap, ctx.dropout = tiling, scale, softcap, dropout
        in_place = not any(ctx.needs_input_grad[:3])  # else the backward reads the output
        return nan_rows(output, broken, in_place), nan_rows(lse, broken, False).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_lse: Tensor):
        query, key, value, output, lse = ctx.saved_tensors
        tiling, scale, softcap, dropout = ctx.tiling, ctx.scale, ctx.softcap, ctx.dropout
        heads, kv_heads = query.shape[1], key.shape[1]
        grad_output = grad_output.contiguous()
        q_blocks = _blocks(query.shape[2], tiling.block_q)
        k_blocks = _blocks(key.shape[2], tiling.block_k)
        compute = lse.dtype
        merge = _use_fused(query, value, softcap, dropout)
        if len(q_blocks) == 1 and tiling.spans(0, k_blocks, merge) == [(0, key.shape[2], None)]:
            # One fused call did the forward (under the dense bias, if one was given): its
            # backward gives the gradients directly, with no accumulators beside them.
            q_len, k_len = query.shape[2], key.shape[2]
            bias = _tile_mask(tiling, 0, None, 0, q_len, 0, k_len, query.device)
            d_q, d_k, d_v = _tile_backward(
                grad_output, query, _expand_heads(key, heads), _expand_heads(value, heads),
                output, lse, bias, scale, softcap, dropout,
            )  # fmt: skip
            d_k, d_v = _sum_groups(d_k, kv_heads), _sum_groups(d_v, kv_heads)
            grads = (d_q.to(query.dtype), d_k.to(key.dtype), d_v.to(value.dtype))
            return (*grads, None, None, None, None, None)
        d_query = torch.zeros(query.shape, dtype=compute, device=query.device)
        d_key = torch.zeros(key.shape, dtype=compute, device=key.device)
        d_value = torch.zeros(value.shape, dtype=compute, device=value.device)
        accumulate_gradients(
            grad_output, query, key, value, output, lse, d_query, d_key, d_value,
            tiling, scale, softcap, dropout,
        )  # fmt: skip
        grads = (d_query.to(query.dtype), d_key.to(key.dtype), d_value.to(value.dtype))
        return (*grads, None, None, None, None, None)


def tiled_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Mask | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention without the N×N matrix. Returns (output, log-sum-exp (batch, heads, q_len)).

    ``mask`` is a structured `Mask` (its empty tiles are skipped); ``bias`` a dense bool mask
    or additive float bias broadcastable to (batch, heads, q_len, k_len). Dropout draws its
    seed from torch's global generator, so ``torch.manual_seed`` makes it reproducible.
    The log-sum-exp is not differentiable. Inputs are assumed validated (see
    `multihead.attention`). Non-finite input gives NaN where the float64 reference has it
    (see kernels/base.py): the rows of a NaN/inf query, and the rows that see a NaN key
    (output and log-sum-exp).
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    dropout = None
    if dropout_p > 0.0:
        dropout = Dropout(dropout_p, int(torch.randint(0, 2**62, (), dtype=torch.int64)))
    if mask is None and bias is None and _use_fused(query, value, softcap, dropout):
        # Nothing to skip: the fused kernel, itself tiled, takes every query in one call.
        block_q = max(query.shape[2], 1)
    tiling = Tiling.build(query.shape[2], key.shape[2], mask, bias, block_q, block_k)
    broken_queries, broken_keys = bad_queries(query), nan_keys(key)
    grad = needs_grad(query, key, value, bias)
    hides = (mask is not None or bias is not None) and (bias is None or bias.dtype == torch.bool)
    if hides:  # a boolean mask hides keys: the tiles it leaves say which rows see a NaN key
        broken = broken_queries | _rows_seeing_tiles(tiling, broken_keys, query.shape)
    else:  # every key is seen (a float bias is added: NaN + bias is NaN, as in the
        # reference, even where a structured mask adds -inf to it)
        broken = broken_queries | rows_seeing(broken_keys, bias, query.shape[1])
    if hides or grad:  # a fused tile adds its mask as -inf, and NaN + -inf is NaN
        key = clean_keys(key)
    if grad:  # the backward multiplies the rows a tile leaves out by 0
        query = clean_queries(query)
    return _TiledAttention.apply(query, key, value, tiling, scale, softcap, dropout, broken)


def _rows_seeing_tiles(tiling: Tiling, broken_keys: Tensor, shape: torch.Size) -> Tensor:
    """(batch, heads, q_len) bool: the rows whose visible keys include a flagged one, tile
    by tile: an empty tile is skipped, a full run needs no mask, a cut tile its own."""
    batch, heads, q_len = shape[0], shape[1], shape[2]
    k_blocks = _blocks(broken_keys.shape[-1], tiling.block_k)
    seen = torch.zeros(batch, heads, q_len, dtype=torch.bool, device=broken_keys.device)
    for i, (q0, q1) in enumerate(_blocks(q_len, tiling.block_q)):
        for k0, k1, j in tiling.spans(i, k_blocks, merge=True):
            mask = _tile_mask(tiling, i, j, q0, q1, k0, k1, broken_keys.device)
            seen[..., q0:q1] |= rows_seeing(broken_keys[..., k0:k1], mask, heads)
    return seen


def _positions(name: str, index: object, size: int, device: torch.device) -> Tensor:
    """``index`` (None = all, a slice, or 1-D integer indices) as int64 positions < size."""
    if index is None or isinstance(index, slice):
        return torch.arange(size, device=device)[index if index is not None else slice(None)]
    if isinstance(index, list | tuple):
        index = torch.as_tensor(index, dtype=torch.int64)
    if (
        not isinstance(index, Tensor)
        or index.dtype.is_floating_point
        or index.dtype.is_complex
        or index.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be None, a slice or 1-D integer indices, got {index!r}")
    if index.ndim != 1:
        raise ValueError(f"{name} must be 1-D indices, got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < -size or int(index.max()) >= size):
        raise ValueError(f"{name} must be in [-{size}, {size}), got {index.tolist()}")
    return index.to(device=device, dtype=torch.int64) % max(size, 1)


def tiled_weights(
    query: Tensor,
    key: Tensor,
    lse: Tensor,
    *,
    rows: slice | Tensor | None = None,
    heads: slice | Tensor | None = None,
    mask: Mask | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """The attention weights of some query rows and heads, recomputed from the log-sum-exp.

    ``lse`` (batch, heads, q_len) is what `tiled_attention` returned for the same inputs,
    mask, scale and softcap. A weight is exp(score − lse): exact, and only the requested
    (rows × k_len) scores of the requested heads are built, so a long sequence can be
    inspected without the full matrix. ``rows``/``heads``: None (all), a slice or 1-D integer
    indices; a key/value head serves its query group (GQA). Returns (batch, len(heads),
    len(rows), k_len) in fp32 (fp64 for fp64 inputs), the reference kernel's weights for those
    rows and heads (before dropout); a row that sees no key gets weights 0.
    """
    batch, num_heads, q_len, _ = query.shape
    k_len, kv_heads = key.shape[2], key.shape[1]
    if tuple(lse.shape) != (batch, num_heads, q_len):
        raise ValueError(
            f"lse has shape {tuple(lse.shape)} but query needs (batch, heads, q_len) = "
            f"{(batch, num_heads, q_len)}, as tiled_attention returns it"
        )
    if mask is not None and (mask.q_len, mask.k_len) != (q_len, k_len):
        raise ValueError(
            f"mask is {mask.q_len}x{mask.k_len} (q_len x k_len) but the inputs are {q_len}x{k_len}"
        )
    device = query.device
    row_idx = _positions("rows", rows, q_len, device)
    head_idx = _positions("heads", heads, num_heads, device)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32

    q = query[:, head_idx][:, :, row_idx].to(compute)  # (B, h, r, D)
    k = key[:, head_idx // (num_heads // kv_heads)].to(compute)  # (B, h, K, D)
    allowed = None
    if mask is not None:
        b = torch.arange(1 if mask.batch is None else mask.batch, device=device).view(-1, 1, 1)
        k_idx = torch.arange(k_len, device=device).view(1, 1, -1)
        allowed = mask.mask_mod(b, row_idx.view(1, -1, 1), k_idx).unsqueeze(1)
    selected = None
    if bias is not None:
        selected = bias.view(1, 1, *bias.shape) if bias.ndim == 2 else bias
        selected = selected if selected.shape[1] == 1 else selected[:, head_idx]
        selected = selected[..., row_idx, :]
    if selected is None or allowed is None:
        tile = allowed if selected is None else selected
    elif selected.dtype == torch.bool:
        tile = selected & allowed
    else:
        tile = selected.masked_fill(~allowed, -torch.inf)
    scores, _ = _scores(q, k, tile, scale, softcap)
    row_lse = lse[:, head_idx][:, :, row_idx].unsqueeze(-1).to(compute)
    # A row that saw no key has lse −inf: use +inf, so that every weight in it is 0.
    return torch.exp(scores - row_lse.masked_fill(row_lse == -torch.inf, torch.inf))


def unsupported(request: Request) -> str | None:
    """Why the tiled kernel cannot serve this request, or None if it can."""
    if request.return_weights:
        return "it does not build the weight matrix"
    return None


# Measured (benchmarks/bench_scale.py): block skipping beats SDPA's dense-mask path once the
# mask leaves at most half of the tiles of a long sequence.
PREFER_MIN_KEYS = 2048
PREFER_MAX_VISITED = 0.5
# The reference kernel builds the score matrix; past this many bytes the tiled one is used.
SCORE_MATRIX_BUDGET = 1 << 30


def _visited_fraction(request: Request) -> float:
    tiling = Tiling.build(
        request.q_len, request.k_len, request.structured, request.bias, BLOCK_Q, BLOCK_K
    )
    n_q, n_k = math.ceil(request.q_len / BLOCK_Q), math.ceil(request.k_len / BLOCK_K)
    if n_q * n_k == 0:  # no queries or no keys: there is nothing to visit
        return 0.0
    return sum(len(tiling.key_blocks(i, n_k)) for i in range(n_q)) / (n_q * n_k)


def preferred(request: Request) -> str | None:
    """Why ``auto`` should run this kernel before the others, or None."""
    if unsupported(request) is not None:
        return None
    batch, heads = request.query.shape[:2]
    score_bytes = batch * heads * request.q_len * request.k_len * 4
    if request.softcap is not None and score_bytes > SCORE_MATRIX_BUDGET:
        return f"soft-capping with a {score_bytes / 2**30:.1f} GiB score matrix"
    if request.is_causal or request.structured is None or request.k_len < PREFER_MIN_KEYS:
        return None
    fraction = _visited_fraction(request)
    if fraction <= PREFER_MAX_VISITED:
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
        softcap=request.softcap,
        dropout_p=request.dropout_p,
    )
    return output, None


def explain(request: Request) -> str:
    fraction = _visited_fraction(request)
    return (
        f"tiled: online softmax over {BLOCK_Q}x{BLOCK_K} tiles, memory linear in length, "
        f"visits {fraction:.0%} of the tiles"
    )
