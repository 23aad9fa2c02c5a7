"""The textbook kernel: softmax(Q Kᵀ / sqrt(d_k)) V, one named step at a time.

It builds the whole (q_len × k_len) score matrix, so it can return the attention weights,
and it runs in any floating dtype: in float64 it is the oracle every other kernel is
tested against. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Request, bad_queries

NAME = "reference"


def unsupported(request: Request) -> str | None:
    """Every request is supported: this is the fallback and the oracle."""
    return None


def preferred(request: Request) -> str | None:
    """The reference kernel runs when another cannot, or when asked for by name."""
    return None


def score_indices(shape: torch.Size, device: torch.device) -> tuple[Tensor, ...]:
    """(b, h, q_idx, kv_idx) for a (B, H, Q, K) score matrix, shaped for broadcasting."""
    batch, heads, q_len, k_len = shape
    return (
        torch.arange(batch, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
        torch.arange(q_len, device=device).view(1, 1, -1, 1),
        torch.arange(k_len, device=device).view(1, 1, 1, -1),
    )


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Top-left causal: query i sees keys 0..i."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()


def softmax(scores: Tensor, *, may_have_empty_rows: bool = True) -> Tensor:
    """Softmax over keys where a row with no visible key gives weights 0, not NaN.

    Empty rows are set to 0 before the softmax (so its backward stays finite) and their
    weights to 0 after it, with tensor ops: no host read, so the kernel compiles and exports
    as one graph. Only a mask can empty a row: without one that pass is skipped. ``scores``
    is the kernel's own fresh tensor: when autograd does not need it, it is overwritten in
    place (as torch's native MHA does), which saves an N×N allocation.
    """
    empty_rows = None
    if may_have_empty_rows:
        empty_rows = scores.amax(dim=-1, keepdim=True) == float("-inf")
        scores = scores.masked_fill(empty_rows, 0.0)
    if scores.requires_grad:
        weights = torch.softmax(scores, dim=-1)
        return weights if empty_rows is None else weights.masked_fill(empty_rows, 0.0)
    weights = torch.softmax(scores, dim=-1, out=scores)
    return weights if empty_rows is None else weights.masked_fill_(empty_rows, 0.0)


def _group_heads(tensor: Tensor, num_kv_heads: int) -> Tensor:
    """(batch|1, heads|1, ...) → (batch|1, kv_heads|1, groups|1, ...) without copying."""
    if tensor.shape[1] == 1:
        return tensor.unsqueeze(2)
    return tensor.unflatten(1, (num_kv_heads, -1))


def forward(request: Request) -> tuple[Tensor, Tensor | None]:
    """Output (batch, heads, q_len, value_dim) and weights (batch, heads, q_len, k_len)."""
    query, key, value = request.query, request.key, request.value
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    num_kv_heads = request.num_kv_heads

    # Grouped-query attention: each key/value head serves a group of query heads.
    # Viewing the query heads as (kv_heads, group) lets matmul broadcast instead of copy.
    q = _group_heads(query.to(compute), num_kv_heads)  # (B, Hkv, G, Q, D)
    k = key.to(compute).unsqueeze(2)  # (B, Hkv, 1, K, D)
    v = value.to(compute).unsqueeze(2)  # (B, Hkv, 1, K, Dv)

    # 1. Scores: how well each query matches each key, scaled by 1/sqrt(d_k).
    scores = (q * request.scale) @ k.transpose(-2, -1)  # (B, Hkv, G, Q, K)
    if request.score_mod is not None:  # ALiBi, a relative bias, soft-capping, ...
        flat = scores.flatten(1, 2)  # (B, H, Q, K)
        modified = request.score_mod(flat, *score_indices(flat.shape, flat.device))
        scores = modified.unflatten(1, scores.shape[1:3])

    # 2. Mask: keys a query may not see get -inf (a float mask is added as a bias).
    if request.is_causal:
        scores = scores.masked_fill(
            ~causal_mask(request.q_len, request.k_len, q.device), -torch.inf
        )
    if request.mask is not None:
        mask = _group_heads(request.mask, num_kv_heads)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -torch.inf)
        else:
            scores = scores + mask.to(compute)

    # 3. Softmax: each query's scores become weights that sum to 1.
    weights = softmax(scores, may_have_empty_rows=request.mask is not None)
    attended = weights
    if request.dropout_p > 0.0:
        attended = F.dropout(weights, p=request.dropout_p, training=True)

    # 4. Weighted sum of the values.
    output = (attended @ v).flatten(1, 2).to(query.dtype)  # (B, H, Q, Dv)
    weights_out = weights.flatten(1, 2) if request.return_weights else None

    # A query row holding NaN/inf gives a NaN row even where the mask hides every key.
    broken = bad_queries(query).unsqueeze(-1)
    output = output.masked_fill(broken, math.nan)
    if weights_out is not None:
        weights_out = weights_out.masked_fill(broken, math.nan)
    return output, weights_out


def explain(request: Request) -> str:
    why = []
    if request.return_weights:
        why.append("the attention weights were requested")
    if request.score_mod is not None:
        why.append(f"the score mod {request.score_mod.name} needs the scores")
    reason = " and ".join(why) or "chosen explicitly"
    return f"reference: the textbook formula with the full score matrix ({reason})"
