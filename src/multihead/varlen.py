"""Packed ragged batches: attention over sequences of different lengths, with no padding.

A padded batch spends work on pad tokens, and a batch of one long and many short sequences
is mostly padding. The varlen layout of flash-attn (Dao, 2023) packs the real tokens of all
sequences end to end, (total_tokens, heads, head_dim), and says where each sequence starts
with ``cu_seqlens`` (cumulative lengths: ``[0, len_0, len_0 + len_1, ...]``).

Two ways to run it, both costing the sum of the per-sequence costs rather than total²:
sequences of some length each get their own attention call (on CPU, torch's fused kernel:
no tile straddles two sequences, and the backward pass is fused too); many short sequences
run as one sequence of the library layout, (1, heads, total, head_dim), under the
block-diagonal `masks.varlen` mask in the tiled kernel, which skips the tiles between
sequences and saves a call per sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import masks
from .functional import attention
from .score_mods import ScoreMod

__all__ = ["attention_varlen", "pack", "unpack"]


def _check_packed(query: object, key: object, value: object) -> None:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 3:
            raise ValueError(
                f"{name} must be 3-D packed (total_tokens, heads, head_dim), "
                f"got shape {tuple(x.shape)}"
            )


def _check_total(name: str, cu_seqlens: Tensor, total: int, tensor_name: str) -> None:
    if int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"{name} ends at {int(cu_seqlens[-1])} but {tensor_name} packs {total} tokens; "
            "the last entry must be the packed length"
        )


def attention_varlen(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    """Attention over a packed batch of ragged sequences, as flash-attn's varlen function.

    Args:
        query: (total_q, heads, head_dim), the queries of every sequence end to end.
        key, value: (total_k, kv_heads, head_dim / value_dim); kv_heads divides heads (GQA).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32/int64 cumulative lengths, starting at
            0 and ending at total_q / total_k. Sequence i is rows
            ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and attends only to keys
            ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``. Lengths may be 0.
        causal: per sequence, bottom-right aligned as flash-attn >= 2.1 (the last query of a
            sequence sees all its keys); identical to top-left when q and k lengths agree.
        scale, softcap, dropout_p: as `multihead.attention`.
        score_mod: as `multihead.attention`, for mods that read only the distance
            ``kv_idx - q_idx`` between a query and a key of the same sequence (ALiBi, T5's
            bias with equal query and key lengths): positions are per sequence on one path
            and in the pack on the other, and the distance is the same on both.

    Returns (total_q, heads, value_dim). A query with no visible key (its sequence has no keys,
    or causal with more queries than keys) gets output 0.
    """
    _check_packed(query, key, value)
    cu_q = masks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    cu_k = masks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    _check_total("cu_seqlens_q", cu_q, query.shape[0], "query")
    _check_total("cu_seqlens_k", cu_k, key.shape[0], "key")
    mask = masks.varlen(cu_q, cu_k, causal=causal)  # checks the batch counts agree
    if query.shape[0] >= PER_SEQUENCE_MIN_MEAN * max(len(cu_q) - 1, 1):
        return _per_sequence(
            query, key, value, cu_q.tolist(), cu_k.tolist(), causal, scale, softcap, dropout_p,
            score_mod,
        )  # fmt: skip
    output = attention(
        query.transpose(0, 1).unsqueeze(0),  # (1, heads, total_q, head_dim)
        key.transpose(0, 1).unsqueeze(0),
        value.transpose(0, 1).unsqueeze(0),
        mask=mask,
        scale=scale,
        softcap=softcap,
        dropout_p=dropout_p,
        score_mod=score_mod,
        kernel="tiled",
    )
    return output.squeeze(0).transpose(0, 1).contiguous()


# Measured (benchmarks/bench_scale.py, ragged part, causal): one tiled call over the pack /
# a call per sequence was 0.52 / 0.92 / 1.54 / 2.00 forward at mean lengths 8 / 16 / 31 / 64
# (0.41 / 0.81 / 1.23 / 1.67 with the backward): from a mean of about 24 a call per sequence
# wins.
PER_SEQUENCE_MIN_MEAN = 24


def _per_sequence(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_q: list[int],
    cu_k: list[int],
    causal: bool,
    scale: float | None,
    softcap: float | None,
    dropout_p: float,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    """One attention call per sequence, outputs packed end to end."""
    heads, value_dim = query.shape[1], value.shape[-1]
    lens_q = [b - a for a, b in zip(cu_q[:-1], cu_q[1:], strict=True)]
    lens_k = [b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)]
    # split, not slicing: its backward is one concatenation, where each slice's backward
    # would write a zero tensor of the whole pack.
    queries, keys, values = query.split(lens_q), key.split(lens_k), value.split(lens_k)
    outputs = []
    for q, k, v in zip(queries, keys, values, strict=True):
        if q.shape[0] == 0:
            continue
        if k.shape[0] == 0:  # no keys: nothing to see, output 0
            outputs.append(query.new_zeros(q.shape[0], heads, value_dim))
            continue
        out = attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            causal="bottom-right" if causal else False,
            scale=scale,
            softcap=softcap,
            dropout_p=dropout_p,
            score_mod=score_mod,
        )
        outputs.append(out.squeeze(0).transpose(0, 1))
    if not outputs:
        return query.new_zeros(0, heads, value_dim)
    return torch.cat(outputs)


def _lengths(lengths: object, batch: int, seq: int) -> Tensor:
    if isinstance(lengths, Tensor):
        checked = lengths
    elif isinstance(lengths, list | tuple):
        checked = torch.as_tensor(lengths, dtype=torch.int64 if not lengths else None)
    else:
        raise TypeError(f"lengths must be a tensor or a list of ints, got {type(lengths).__name__}")
    if checked.dtype.is_floating_point or checked.dtype.is_complex or checked.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers, got {checked.dtype}")
    if checked.shape != (batch,):
        raise ValueError(
            f"lengths must have shape ({batch},), one per batch element, got {tuple(checked.shape)}"
        )
    if batch and (int(checked.min()) < 0 or int(checked.max()) > seq):
        raise ValueError(
            f"lengths must be in [0, {seq}] (the padded length), got {checked.tolist()}"
        )
    return checked.to(torch.int64)


def pack(padded: Tensor, lengths: Tensor | list[int]) -> tuple[Tensor, Tensor]:
    """Drop the padding: (batch, seq, ...) with ``lengths`` → (total_tokens, ...), cu_seqlens.

    Batch element b keeps its first ``lengths[b]`` positions; ``cu_seqlens`` is int32, as
    flash-attn expects. Differentiable (it is an index).
    """
    if not isinstance(padded, Tensor):
        raise TypeError(f"padded must be a torch.Tensor, got {type(padded).__name__}")
    if padded.ndim < 2:
        raise ValueError(f"padded must be (batch, seq, ...), got shape {tuple(padded.shape)}")
    batch, seq = padded.shape[:2]
    lengths = _lengths(lengths, batch, seq).to(padded.device)
    valid = torch.arange(seq, device=padded.device) < lengths.unsqueeze(1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return padded[valid], cu_seqlens


def unpack(packed: Tensor, cu_seqlens: Tensor, max_len: int | None = None) -> Tensor:
    """Pad again: (total_tokens, ...) → (batch, max_len, ...), zeros after each sequence.

    ``max_len`` defaults to the longest sequence. Differentiable; inverse of `pack`.
    """
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.ndim < 1:
        raise ValueError("packed must be (total_tokens, ...), got a 0-D tensor")
    cu = masks.check_cu_seqlens("cu_seqlens", cu_seqlens).to(packed.device)
    _check_total("cu_seqlens", cu, packed.shape[0], "packed")
    lengths = cu.diff()
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int or None, got {type(max_len).__name__}")
    if max_len < longest:
        raise ValueError(f"max_len is {max_len} but the longest sequence has {longest} tokens")
    valid = torch.arange(max_len, device=packed.device) < lengths.unsqueeze(1)
    padded = packed.new_zeros(lengths.numel(), max_len, *packed.shape[1:])
    return padded.index_put((valid,), packed)
