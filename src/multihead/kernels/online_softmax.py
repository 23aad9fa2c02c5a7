"""The online-softmax engine: attention over key spans, merged by their log-sum-exp.

The score matrix is never built. A `Plan` cuts the queries into row blocks and says which
key spans each one visits: the mask's empty tiles are left out, a run of visited tiles is
one span (one call of torch's fused kernel, with an additive mask only where the mask cuts
a tile), and consecutive row blocks that visit the same spans are merged into one call.
Each span gives a partial output and its log-sum-exp; they merge exactly:
out = Σ_j exp(lse_j − lse)·out_j with lse = log Σ_j exp(lse_j) (Milakov & Gimelshein 2018;
Dao et al. 2022). The backward recomputes each span from the saved log-sum-exp, so memory
stays linear in the sequence length. The tiled kernel and ring attention both run on it.

A span runs torch's fused CPU flash kernel when it can (CPU, fp32/bf16/fp16, no dropout, a
score mod that only adds a bias) and the same steps written out in torch otherwise
(float64, soft-capping and other score mods, other devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..masks import EMPTY, FULL, Mask
from ..score_mods import ScoreMod
from .base import combine_masks, rows_seeing

__all__ = [
    "BLOCK_K",
    "BLOCK_Q",
    "Dropout",
    "Plan",
    "Rows",
    "Span",
    "accumulate_gradients",
    "attend_rows",
    "merge",
]

# Tile sides for the mask's block structure. Rows: torch's fused CPU kernel splits a call of
# 192+ queries into blocks of 64 (32 below that), which reuse each key block twice as often:
# measured (benchmarks/bench_flex.py shapes, 2 threads), 256-row calls beat 64-row ones by
# 1.2x (window 256) to 1.8x (prefix-LM) despite the wasted half tile on a window's edge.
# Keys: finer, so that a span ends close to the mask's edge.
BLOCK_Q = 256
BLOCK_K = 128
# Consecutive row blocks that visit the same spans become one call while rows × keys stays
# under this (a document of 1,024 tokens is one call); unmasked ones always merge.
MERGE_BUDGET = 1 << 21

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Span:
    """Keys [k0, k1) visited by a row block; ``cut``: the sub-ranges where the mask must be
    evaluated (the rest of the span is fully visible); ``tile``: a dropout seed offset."""

    k0: int
    k1: int
    cut: tuple[tuple[int, int], ...]
    tile: int


@dataclass(frozen=True)
class Rows:
    """Queries [q0, q1) and the key spans they visit."""

    q0: int
    q1: int
    spans: tuple[Span, ...]


@dataclass(frozen=True)
class Plan:
    """How the (q_len × k_len) plane is covered: row blocks, each with its key spans."""

    q_len: int
    k_len: int
    rows: tuple[Rows, ...]
    mask: Mask | None
    bias: Tensor | None  # tensor mask: bool or float (batch|1, heads|1, Q, K), sliced per span
    visited: int  # (query, key) pairs the spans cover
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # span masks

    @staticmethod
    def build(
        q_len: int,
        k_len: int,
        mask: Mask | None,
        bias: Tensor | None,
        block_q: int | None = None,
        block_k: int | None = None,
    ) -> Plan:
        """The plan for these lengths and masks; tiles of BLOCK_Q × BLOCK_K by default (read
        at call time, so a test can shrink them)."""
        block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
        if mask is None or q_len == 0 or k_len == 0:
            spans = (Span(0, k_len, (), 0),) if k_len else ()
            rows = (Rows(0, q_len, spans),) if q_len else ()
            return Plan(q_len, k_len, rows, mask, bias, q_len * k_len)
        key = ("plan", q_len, k_len, block_q, block_k)
        if bias is None and key in mask._cache:  # planned already: `auto`, or another layer
            return mask._cache[key]
        structure = mask.tiles(block_q, block_k).tolist()  # cached on the mask
        n_k = len(structure[0])
        row_blocks = []
        for i, tiles in enumerate(structure):
            q0, q1 = i * block_q, min((i + 1) * block_q, q_len)
            row_blocks.append(Rows(q0, q1, _spans(tiles, i * n_k, block_k, k_len)))
        rows = _merge_rows(row_blocks, bias is not None)
        visited = sum((r.q1 - r.q0) * sum(s.k1 - s.k0 for s in r.spans) for r in rows)
        plan = Plan(q_len, k_len, tuple(rows), mask, bias, visited, {})
        if bias is None:  # a plan of the mask alone is the same for every call with it
            mask._cache[key] = plan
        return plan

    @property
    def fraction(self) -> float:
        """The share of the q_len × k_len scores that the spans compute."""
        total = self.q_len * self.k_len
        return self.visited / total if total else 0.0

    def span_mask(
        self, rows: Rows, span: Span, device: torch.device, dtype: torch.dtype | None = None
    ) -> Tensor | None:
        """The span's mask, broadcastable to (batch, heads, rows, keys): None (fully
        visible), bool (True = may attend) or a float bias; with ``dtype``, as the additive
        mask the fused kernel takes (−inf where blocked). The structured mask is evaluated
        only on the span's cut sub-ranges."""
        return self._cached("mask", rows, span, device, dtype)

    def empty_rows(self, rows: Rows, span: Span, device: torch.device) -> Tensor | None:
        """(batch|1, heads|1, rows|1, 1) bool: the rows that see no key of the span."""
        return self._cached("empty", rows, span, device, None)

    def _cached(
        self, kind: str, rows: Rows, span: Span, device: torch.device, dtype: torch.dtype | None
    ) -> Tensor | None:
        """A span's mask or empty rows; a mask that depends only on q − k (causal, a window)
        is evaluated once per tile geometry and reused all along the diagonal."""
        key = None
        if self.bias is None and getattr(self.mask, "translation_invariant", False) and span.cut:
            shift = rows.q0
            cut = tuple((k0 - shift, k1 - shift) for k0, k1 in span.cut)
            key = (kind, rows.q1 - shift, span.k0 - shift, span.k1 - shift, cut, device, dtype)
            if key in self.cache:
                return self.cache[key]
        # The fused path asks for the additive mask and the empty rows, the NaN check for the
        # boolean mask, all of the same span in a row: it is evaluated once for them.
        last = self.cache.get("last")
        if last is not None and last[0] == (rows, span, device):
            mask = last[1]
        else:
            mask = self._span_mask(rows, span, device)
            self.cache["last"] = ((rows, span, device), mask)
        if kind == "empty":
            result = _empty_rows(mask)
        elif dtype is not None and mask is not None and mask.dtype == torch.bool:
            result = torch.where(mask, 0.0, -torch.inf).to(dtype)
        else:
            result = mask if dtype is None or mask is None else mask.to(dtype)
        if key is not None:
            self.cache[key] = result
        return result

    def _span_mask(self, rows: Rows, span: Span, device: torch.device) -> Tensor | None:
        allowed = None
        if span.cut and self.mask is not None:
            parts = [self.mask.evaluate(rows.q0, rows.q1, k0, k1, device) for k0, k1 in span.cut]
            if len(span.cut) == 1 and span.cut[0] == (span.k0, span.k1):
                allowed = parts[0]
            else:
                shape = torch.broadcast_shapes(*(p.shape[:3] for p in parts))
                allowed = torch.ones(*shape, span.k1 - span.k0, dtype=torch.bool, device=device)
                for (k0, k1), part in zip(span.cut, parts, strict=True):
                    allowed[..., k0 - span.k0 : k1 - span.k0] = part
        bias = None if self.bias is None else self.bias[..., rows.q0 : rows.q1, span.k0 : span.k1]
        return combine_masks(allowed, bias)


# A run of full tiles at least this many keys long is its own span, without a mask, rather
# than part of a masked span (a prefix-LM's prefix, a long document's past): a mask over
# it would be read once per head for nothing. Shorter full runs join their cut neighbours,
# saving a call and a merge.
SPLIT_KEYS = 512


def _spans(tiles: list[int], first_tile: int, block_k: int, k_len: int) -> tuple[Span, ...]:
    """The key spans of one row of tiles: runs of visited tiles, a long full run alone."""
    segments: list[tuple[int, int, bool, int]] = []  # (k0, k1, cut, tile) of one kind
    for j, kind in enumerate(tiles):
        if kind == EMPTY:
            continue
        k0, k1, cut = j * block_k, min((j + 1) * block_k, k_len), kind != FULL
        if segments and segments[-1][1] == k0 and segments[-1][2] == cut:
            segments[-1] = (segments[-1][0], k1, cut, segments[-1][3])
        else:
            segments.append((k0, k1, cut, first_tile + j))
    spans: list[Span] = []
    for k0, k1, cut, tile in segments:
        alone = not cut and k1 - k0 >= SPLIT_KEYS
        last = spans[-1] if spans else None
        joinable = (
            last is not None and last.k1 == k0 and (last.cut or last.k1 - last.k0 < SPLIT_KEYS)
        )
        if joinable and not alone:
            assert last is not None
            spans[-1] = Span(last.k0, k1, last.cut + (((k0, k1),) if cut else ()), last.tile)
        else:
            spans.append(Span(k0, k1, ((k0, k1),) if cut else (), tile))
    return tuple(spans)


def _merge_rows(blocks: list[Rows], has_bias: bool) -> list[Rows]:
    merged: list[Rows] = []
    for block in blocks:
        if merged and _same_spans(merged[-1], block):
            last = merged[-1]
            keys = sum(s.k1 - s.k0 for s in block.spans)
            masked = has_bias or any(s.cut for s in block.spans)
            if not masked or (block.q1 - last.q0) * keys <= MERGE_BUDGET:
                merged[-1] = Rows(last.q0, block.q1, last.spans)
                continue
        merged.append(block)
    return merged


def _same_spans(a: Rows, b: Rows) -> bool:
    if len(a.spans) != len(b.spans):
        return False
    return all(
        (x.k0, x.k1, x.cut) == (y.k0, y.k1, y.cut) for x, y in zip(a.spans, b.spans, strict=True)
    )


@dataclass(frozen=True)
class Dropout:
    """Attention dropout that the backward pass can replay: each span's keep-mask is drawn
    from a generator seeded with (seed, span), so nothing N×N is stored."""

    p: float
    seed: int

    def keep(self, shape: torch.Size, tile: int, device: torch.device) -> Tensor:
        generator = torch.Generator(device=device).manual_seed(self.seed + tile)
        return torch.rand(shape, generator=generator, device=device) >= self.p


def fused_available(query: Tensor, value: Tensor, dropout: Dropout | None) -> bool:
    """Whether torch's fused CPU kernel can compute these spans (score mods aside)."""
    return (
        _FUSED is not None
        and query.shape[-1] == value.shape[-1]
        and dropout is None
        and query.device.type == "cpu"
        and query.dtype in _FUSED_DTYPES
    )


def _indices(batch: int, heads: int, q0: int, q1: int, k0: int, k1: int, device: torch.device):
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
    k = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
    return b, h, q, k


@dataclass(frozen=True)
class Tile:
    """One row block against one span: the slices and what changes their scores."""

    q: Tensor  # (B, H, rows, D)
    k: Tensor  # (B, H, keys, D), key/value heads already expanded to the query heads
    v: Tensor
    plan: Plan
    rows: Rows
    span: Span
    score_mod: ScoreMod | None
    scale: float
    dropout: Dropout | None

    @property
    def mask(self) -> Tensor | None:
        """bool or float, broadcastable to (B, H, rows, keys); None: every key visible."""
        return self.plan.span_mask(self.rows, self.span, self.q.device)

    def indices(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, heads = self.q.shape[:2]
        r, s = self.rows, self.span
        return _indices(batch, heads, r.q0, r.q1, s.k0, s.k1, self.q.device)

    def fused(self) -> bool:
        return fused_available(self.q, self.v, self.dropout) and (
            self.score_mod is None or self.score_mod.additive
        )

    def additive(self, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        """For the fused kernel: the additive mask (mask as −inf plus an additive score
        mod's bias), and a per-row shift to add to its log-sum-exp (a separable bias's row
        part, left out of the mask since softmax ignores it)."""
        additive = self.plan.span_mask(self.rows, self.span, self.q.device, dtype)
        shift = None
        if self.score_mod is not None:
            _, h, q, k = self.indices()
            parts = self.score_mod.bias_parts(
                h, q, k, (self.rows.q0, self.rows.q1, self.span.k0, self.span.k1)
            )
            if parts is not None:
                shift, extra = parts[0].to(torch.float32), parts[1].to(dtype)
            else:
                extra = self.score_mod.bias(h, q, k).to(dtype)
            additive = extra if additive is None else additive + extra
        return additive, shift

    def scores(self, compute: torch.dtype) -> tuple[Tensor, Tensor]:
        """Written-out (raw scores, scores after the score mod and the mask)."""
        raw = (self.q.to(compute) * self.scale) @ self.k.to(compute).transpose(-2, -1)
        return raw, self.finish(raw)

    def finish(self, raw: Tensor) -> Tensor:
        scores = raw if self.score_mod is None else self.score_mod(raw, *self.indices())
        if self.mask is not None:
            if self.mask.dtype == torch.bool:
                scores = scores.masked_fill(~self.mask, -torch.inf)
            else:
                scores = scores + self.mask.to(scores.dtype)
        return scores


def _empty_rows(mask: Tensor | None) -> Tensor | None:
    """(B|1, H|1, rows|1, 1): rows of the tile where no key is visible."""
    if mask is None:
        return None
    visible = mask if mask.dtype == torch.bool else mask > -torch.inf
    return ~visible.any(-1, keepdim=True)


def tile_forward(tile: Tile) -> tuple[Tensor, Tensor]:
    """(partial output (B,H,rows,Dv), log-sum-exp (B,H,rows,1)), in fp32 or fp64."""
    q, k, v = tile.q, tile.k, tile.v
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if tile.fused():
        additive, shift = tile.additive(q.dtype)
        out, lse = _FUSED(q, k, v, attn_mask=additive, scale=tile.scale)[:2]
        lse = lse.unsqueeze(-1).to(compute)
        empty = tile.plan.empty_rows(tile.rows, tile.span, q.device)
        if empty is not None:  # the fused kernel reports lse 0 for rows it could not see
            lse = lse.masked_fill(empty, -torch.inf)
        if shift is not None:
            lse = lse + shift
        return out.to(compute), lse
    _, scores = tile.scores(compute)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.exp(scores - lse.masked_fill(lse == -torch.inf, 0.0))
    if tile.dropout is not None:
        p = p * tile.dropout.keep(p.shape, tile.span.tile, p.device) / (1.0 - tile.dropout.p)
    return p @ v.to(compute), lse


def tile_backward(
    tile: Tile, d_out: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor | None, ...]]:
    """Gradients of one tile given the final output and log-sum-exp of its query rows:
    (d_q, d_k, d_v, gradients of the score mod's tensors).

    With the global ``lse`` the tile's probabilities are exactly its slice of the softmax,
    and delta = rowsum(dO ∘ O) uses the global output, so the tiles' gradients add up.
    Rows that saw no key carry lse = +inf here, which makes their probabilities 0.
    """
    safe_lse = lse.masked_fill(lse == -torch.inf, torch.inf)
    mod = tile.score_mod
    learned = mod is not None and any(t.requires_grad for t in mod.tensors)
    if tile.fused() and not learned:
        additive, shift = tile.additive(tile.q.dtype)
        if shift is not None:
            safe_lse = safe_lse - shift
        d_q, d_k, d_v = _FUSED_BACKWARD(
            d_out, tile.q, tile.k, tile.v, out, safe_lse.squeeze(-1).to(torch.float32),
            0.0, False, attn_mask=additive, scale=tile.scale,
        )  # fmt: skip
        return d_q, d_k, d_v, ()
    compute = safe_lse.dtype
    q, k, v = tile.q.to(compute), tile.k.to(compute), tile.v.to(compute)
    d_out, out = d_out.to(compute), out.to(compute)
    raw = (q * tile.scale) @ k.transpose(-2, -1)
    with torch.enable_grad():
        raw.requires_grad_(mod is not None)
        scores = tile.finish(raw)
    p = torch.exp(scores.detach() - safe_lse)
    d_p = d_out @ v.transpose(-2, -1)
    if tile.dropout is None:
        d_v = p.transpose(-2, -1) @ d_out
    else:  # O = (P ∘ keep / (1-p)) V: the same keep-mask scales both paths
        kept = tile.dropout.keep(p.shape, tile.span.tile, p.device) / (1.0 - tile.dropout.p)
        d_v = (p * kept).transpose(-2, -1) @ d_out
        d_p = d_p * kept
    d_scores = p * (d_p - (d_out * out).sum(-1, keepdim=True))
    mod_grads: tuple[Tensor | None, ...] = ()
    if mod is not None:
        wanted = [raw, *(t for t in mod.tensors if t.requires_grad)]
        grads = torch.autograd.grad(scores, wanted, d_scores, allow_unused=True)
        d_scores = grads[0] if grads[0] is not None else torch.zeros_like(raw)
        it = iter(grads[1:])
        mod_grads = tuple(next(it) if t.requires_grad else None for t in mod.tensors)
    d_scores = d_scores * tile.scale
    return d_scores @ k, d_scores.transpose(-2, -1) @ q, d_v, mod_grads


def expand_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, kv_heads, n, d) → (B, heads, n, d): each key/value head serves its query group."""
    if x.shape[1] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def sum_groups(grad: Tensor, num_kv_heads: int) -> Tensor:
    """(B, heads, n, d) → (B, kv_heads, n, d): a shared key/value head gets its group's sum."""
    if grad.shape[1] == num_kv_heads:
        return grad
    return grad.unflatten(1, (num_kv_heads, -1)).sum(2)


def tiles_of(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: Plan,
    rows: Rows,
    score_mod: ScoreMod | None,
    scale: float,
    dropout: Dropout | None,
):
    """The tiles of one row block, one per span, built lazily. ``key``/``value`` have the
    query's heads (see `expand_heads`): a span is a view, no copy."""
    q = query[..., rows.q0 : rows.q1, :]
    for span in rows.spans:
        yield Tile(
            q,
            key[..., span.k0 : span.k1, :],
            value[..., span.k0 : span.k1, :],
            plan,
            rows,
            span,
            score_mod,
            scale,
            dropout,
        )


def merge(outs: list[Tensor], lses: list[Tensor], out: Tensor, lse: Tensor) -> None:
    """Write the merge of a row block's span results into ``out`` and ``lse``.

    Each span's output is softmax-normalised over its own keys; weighted by its share of the
    mass, exp(lse_j − lse) with lse = log Σ_j exp(lse_j), they sum to the exact output.
    """
    if len(outs) == 1:
        out.copy_(outs[0])
        lse.copy_(lses[0])
        return
    stacked = torch.stack(lses)  # (spans, B, H, rows, 1)
    total = torch.logsumexp(stacked, dim=0)
    weights = torch.exp(stacked - total.masked_fill(total == -torch.inf, 0.0))
    lse.copy_(total)
    out.zero_()
    for span_out, weight in zip(outs, weights, strict=True):
        out.addcmul_(span_out, weight)


def attend_rows(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: Plan,
    out: Tensor,
    lse: Tensor,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    dropout: Dropout | None = None,
    flagged: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Attention of every row block over its spans, written into ``out`` (B, H, Q, Dv) and
    ``lse`` (B, H, Q, 1) (compute dtype; rows that see nothing stay as given).

    ``flagged`` = (key flags (B, kv_heads, K), seen (B, H, Q) bool): each row that sees a
    flagged key through the spans' masks is set in ``seen`` (NaN keys: see kernels/base.py).
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    # Grouped-query attention: each key/value head is copied to its query group once per
    # call (memory: the keys × the group size), not once per span.
    key, value = expand_heads(key, query.shape[1]), expand_heads(value, query.shape[1])
    for rows in plan.rows:
        results = []
        for tile in tiles_of(query, key, value, plan, rows, score_mod, scale, dropout):
            results.append(tile_forward(tile))
            if flagged is not None:
                flags, seen = flagged
                span_flags = flags[..., tile.span.k0 : tile.span.k1]
                seen[..., rows.q0 : rows.q1] |= rows_seeing(span_flags, tile.mask, query.shape[1])
        if results:
            outs, lses = zip(*results, strict=True)
            merge(
                list(outs),
                list(lses),
                out[..., rows.q0 : rows.q1, :],
                lse[..., rows.q0 : rows.q1, :],
            )


def accumulate_gradients(
    grad_output: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    output: Tensor,
    lse: Tensor,
    grads: tuple[Tensor, Tensor, Tensor],
    plan: Plan,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    dropout: Dropout | None = None,
) -> list[Tensor | None]:
    """Add every span's gradients to ``grads`` = (d_query, d_key, d_value) in place (in
    lse's dtype; key/value gradients summed over each GQA group), and return the score
    mod's tensors' gradients. ``output`` and ``lse`` are those of the query rows over all
    their keys, so the spans' gradients add up."""
    d_query, d_key, d_value = grads
    heads, kv_heads = query.shape[1], key.shape[1]
    compute = lse.dtype
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    mod_grads: list[Tensor | None] = [None] * (len(score_mod.tensors) if score_mod else 0)
    key, value = expand_heads(key, heads), expand_heads(value, heads)  # once, as forward
    if kv_heads != heads:  # per query head here; each group's sum is added at the end
        d_key_kv, d_value_kv = d_key, d_value
        d_key, d_value = (
            torch.zeros(x.shape, dtype=compute, device=x.device) for x in (key, value)
        )
    for rows in plan.rows:
        r0, r1 = rows.q0, rows.q1
        d_out, out, row_lse = grad_output[..., r0:r1, :], output[..., r0:r1, :], lse[..., r0:r1, :]
        for tile in tiles_of(query, key, value, plan, rows, score_mod, scale, dropout):
            d_q, d_k, d_v, d_mod = tile_backward(tile, d_out, out, row_lse)
            s = tile.span
            d_query[..., r0:r1, :] += d_q
            d_key[..., s.k0 : s.k1, :] += d_k
            d_value[..., s.k0 : s.k1, :] += d_v
            for n, grad in enumerate(d_mod):
                if grad is not None:
                    mod_grads[n] = grad if mod_grads[n] is None else mod_grads[n] + grad
    if kv_heads != heads:
        d_key_kv += sum_groups(d_key, kv_heads)
        d_value_kv += sum_groups(d_value, kv_heads)
    return mod_grads
