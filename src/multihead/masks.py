"""Attention masks: one type, one polarity.

A `Mask` says which keys each query may see: boolean **True = may attend**. It is stored
as a small function of positions (as FlexAttention's ``mask_mod``) rather than an N×N
tensor, so masks compose with ``&`` and ``|`` for free, a dense tensor is built only when a
kernel asks for one, and a kernel can ask which tiles are empty, full or partial without
ever holding the whole matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "Mask",
    "VarlenMask",
    "causal",
    "documents",
    "padding",
    "sliding_window",
    "varlen",
]

# (batch_idx (B,1,1), q_idx (1,Q,1), k_idx (1,1,K)) -> bool, broadcast to (B|1, Q, K).
MaskMod = Callable[[Tensor, Tensor, Tensor], Tensor]

EMPTY, PARTIAL, FULL = 0, 1, 2
ALIGNMENTS = ("top-left", "bottom-right")


@dataclass(frozen=True)
class Mask:
    """Which keys each query may attend to, as a function of positions.

    ``batch`` is None when the mask is the same for every batch element (causal, sliding
    window), else the batch size it was built for (padding, documents).
    """

    q_len: int
    k_len: int
    mask_mod: MaskMod
    name: str
    batch: int | None = None
    device: torch.device | None = None

    # -- algebra ---------------------------------------------------------------------------
    def _combine(self, other: Mask, op: str) -> Mask:
        if not isinstance(other, Mask):
            raise TypeError(f"can only combine a Mask with a Mask, got {type(other).__name__}")
        if (self.q_len, self.k_len) != (other.q_len, other.k_len):
            raise ValueError(
                f"cannot combine masks of different sizes: {self.name} is "
                f"{self.q_len}x{self.k_len}, {other.name} is {other.q_len}x{other.k_len}"
            )
        if self.batch is not None and other.batch is not None and self.batch != other.batch:
            raise ValueError(
                f"cannot combine masks built for different batch sizes: {self.name} has "
                f"{self.batch}, {other.name} has {other.batch}"
            )
        first, second = self.mask_mod, other.mask_mod
        if op == "&":

            def mod(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return first(b, q, k) & second(b, q, k)
        else:

            def mod(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return first(b, q, k) | second(b, q, k)

        return Mask(
            q_len=self.q_len,
            k_len=self.k_len,
            mask_mod=mod,
            name=f"({self.name} {op} {other.name})",
            batch=self.batch if self.batch is not None else other.batch,
            device=self.device or other.device,
        )

    def __and__(self, other: Mask) -> Mask:
        return self._combine(other, "&")

    def __or__(self, other: Mask) -> Mask:
        return self._combine(other, "|")

    def __invert__(self) -> Mask:
        mod = self.mask_mod
        return Mask(
            self.q_len,
            self.k_len,
            lambda b, q, k: ~mod(b, q, k),
            f"~{self.name}",
            self.batch,
            self.device,
        )

    # -- materialising ---------------------------------------------------------------------
    def _indices(
        self, q_start: int, q_stop: int, k_start: int, k_stop: int, device: torch.device | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        device = device or self.device
        b = torch.arange(1 if self.batch is None else self.batch, device=device).view(-1, 1, 1)
        q = torch.arange(q_start, q_stop, device=device).view(1, -1, 1)
        k = torch.arange(k_start, k_stop, device=device).view(1, 1, -1)
        return b, q, k

    def to_dense(self, device: torch.device | str | None = None) -> Tensor:
        """The boolean tensor of shape (batch|1, 1, q_len, k_len); True = may attend."""
        device = torch.device(device) if device is not None else None
        b, q, k = self._indices(0, self.q_len, 0, self.k_len, device)
        dense = self.mask_mod(b, q, k).expand(b.shape[0], self.q_len, self.k_len)
        return dense.unsqueeze(1)

    def block_structure(self, block_q: int, block_k: int) -> Tensor:
        """Classify each (block_q × block_k) tile as EMPTY, PARTIAL or FULL.

        Returns an int8 tensor of shape (batch|1, ceil(q_len/block_q), ceil(k_len/block_k)).
        Built one query block at a time, so it never holds the whole N×N mask; a kernel skips
        EMPTY tiles and drops the mask on FULL ones.
        """
        if block_q <= 0 or block_k <= 0:
            raise ValueError(f"block sizes must be positive, got {block_q} and {block_k}")
        n_q = -(-self.q_len // block_q)
        n_k = -(-self.k_len // block_k)
        batch = 1 if self.batch is None else self.batch  # a batch of 0 stays 0
        out = torch.empty(batch, n_q, n_k, dtype=torch.int8, device=self.device)
        pad_k = n_k * block_k - self.k_len
        for i in range(n_q):
            q0, q1 = i * block_q, min((i + 1) * block_q, self.q_len)
            b, q, k = self._indices(q0, q1, 0, self.k_len, None)
            rows = self.mask_mod(b, q, k).expand(b.shape[0], q1 - q0, self.k_len)
            # Padding past k_len is neither allowed nor blocked: count it as both.
            allowed = torch.nn.functional.pad(rows, (0, pad_k), value=True)
            blocked = torch.nn.functional.pad(~rows, (0, pad_k), value=True)
            tiles_any = (~blocked).reshape(b.shape[0], q1 - q0, n_k, block_k).any(-1).any(1)
            tiles_all = allowed.reshape(b.shape[0], q1 - q0, n_k, block_k).all(-1).all(1)
            out[:, i] = torch.where(
                tiles_all,
                FULL,
                torch.where(tiles_any, PARTIAL, EMPTY),
            ).to(torch.int8)
        return out

    def __repr__(self) -> str:
        batch = f", batch={self.batch}" if self.batch is not None else ""
        return f"Mask({self.name}, {self.q_len}x{self.k_len}{batch})"


@dataclass(frozen=True)
class BandMask(Mask):
    """A causal or sliding-window mask: query q may see key k when 0 <= q + offset - k < window.

    Its block structure follows from the band's edges in O(tiles), without evaluating every
    (query, key) pair, which is most of the cost of skipping tiles on a long sequence.
    Combined with other masks it becomes a plain `Mask`.
    """

    offset: int = 0
    window: int | None = None

    def block_structure(self, block_q: int, block_k: int) -> Tensor:
        """As `Mask.block_structure`: a tile is empty when the band misses it, full when the
        band covers it."""
        if block_q <= 0 or block_k <= 0:
            raise ValueError(f"block sizes must be positive, got {block_q} and {block_k}")
        q0 = torch.arange(0, self.q_len, block_q, device=self.device).unsqueeze(1)
        k0 = torch.arange(0, self.k_len, block_k, device=self.device).unsqueeze(0)
        q1 = (q0 + block_q).clamp(max=self.q_len)
        k1 = (k0 + block_k).clamp(max=self.k_len)
        # distance d = q + offset - k over the tile, from its nearest to its farthest corner
        d_min = q0 - (k1 - 1) + self.offset
        d_max = (q1 - 1) - k0 + self.offset
        window = self.window if self.window is not None else self.q_len + self.k_len + 1
        empty = (d_max < 0) | (d_min >= window)
        full = (d_min >= 0) & (d_max < window)
        structure = torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL))
        return structure.to(torch.int8).unsqueeze(0)


def _check_len(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _as_int_tensor(name: str, value: object) -> Tensor:
    """``value`` as a tensor; TypeError (not torch's RuntimeError) for what is not numbers."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{name} must be a tensor or a (nested) list of ints, got {type(value).__name__} "
            f"({error})"
        ) from None


def causal(q_len: int, k_len: int | None = None, align: str = "top-left") -> Mask:
    """Each query sees only keys at or before its own position.

    ``top-left``: query i sees keys 0..i (training, q_len == k_len).
    ``bottom-right``: the last query sees every key; query i sees keys
    0..i + (k_len - q_len) (decoding new queries after a cache of earlier keys).
    """
    k_len = q_len if k_len is None else k_len
    _check_len("q_len", q_len)
    _check_len("k_len", k_len)
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    offset = 0 if align == "top-left" else k_len - q_len
    return BandMask(
        q_len,
        k_len,
        lambda b, q, k: k <= q + offset,
        "causal" if align == "top-left" else "causal(bottom-right)",
        offset=offset,
    )


def sliding_window(
    q_len: int, k_len: int | None = None, window: int = 256, align: str = "top-left"
) -> Mask:
    """Causal attention to the last ``window`` keys only (the query's own key included)."""
    k_len = q_len if k_len is None else k_len
    _check_len("window", window)
    if window == 0:
        raise ValueError("window must be >= 1, got 0")
    causal(q_len, k_len, align)  # validates the lengths and the alignment
    offset = 0 if align == "top-left" else k_len - q_len
    return BandMask(
        q_len,
        k_len,
        lambda b, q, k: (k <= q + offset) & (k > q + offset - window),
        f"sliding_window({window})",
        offset=offset,
        window=window,
    )


def padding(
    lengths: Tensor | list[int], max_len: int | None = None, q_len: int | None = None
) -> Mask:
    """Key padding: in batch element b only the first ``lengths[b]`` keys are real.

    ``q_len`` defaults to ``max_len`` (self-attention over the same padded batch).
    """
    lengths = _as_int_tensor("lengths", lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (batch,), got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    max_len = longest if max_len is None else max_len
    _check_len("max_len", max_len)
    if longest > max_len:
        raise ValueError(f"lengths must be <= max_len={max_len}, got a length of {longest}")
    q_len = max_len if q_len is None else q_len
    _check_len("q_len", q_len)
    return Mask(
        q_len,
        max_len,
        lambda b, q, k: k < lengths.to(k.device)[b],
        "padding",
        batch=lengths.numel(),
        device=lengths.device,
    )


def documents(doc_ids: Tensor | list[int] | list[list[int]]) -> Mask:
    """Block-diagonal mask for packed sequences: a token sees only tokens of its document.

    ``doc_ids`` is (seq,) or (batch, seq): the document each position belongs to.
    Combine with ``causal`` for packed causal language modelling.
    """
    ids = _as_int_tensor("doc_ids", doc_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"doc_ids must be an integer tensor, got {ids.dtype}")
    if ids.ndim == 1:
        batch = None
        ids = ids.unsqueeze(0)
    elif ids.ndim == 2:
        batch = ids.shape[0]
    else:
        raise ValueError(f"doc_ids must be (seq,) or (batch, seq), got shape {tuple(ids.shape)}")
    seq = ids.shape[1]

    def mod(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        table = ids.to(q.device)  # (batch|1, seq)
        if batch is not None:
            table = table[b.view(-1)]
        return table[:, q.view(-1)].unsqueeze(-1) == table[:, k.view(-1)].unsqueeze(-2)

    return Mask(seq, seq, mod, "documents", batch=batch, device=ids.device)


def check_cu_seqlens(name: str, cu_seqlens: object) -> Tensor:
    """Validate cumulative sequence lengths (flash-attn's ``cu_seqlens``) as int64.

    ``cu_seqlens[i]`` is where sequence i starts in the packed tensor and ``cu_seqlens[-1]``
    the packed length: 1-D, integer, starting at 0, non-decreasing, ``batch + 1`` entries.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex:
        raise TypeError(
            f"{name} must be an integer tensor (int32 or int64), got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got torch.bool")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() == 0:
        raise ValueError(
            f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
    if bool((cu.diff() < 0).any()):
        raise ValueError(f"{name} must be non-decreasing (lengths >= 0), got {cu.tolist()}")
    return cu


def varlen(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor | None = None, causal: bool = False) -> Mask:
    """Block-diagonal mask for a packed ragged batch (flash-attn's varlen layout).

    Query sequence i is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of the packed queries and
    sees only keys ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` (``cu_seqlens_k`` defaults to
    ``cu_seqlens_q``: self-attention). As `documents`, but the blocks may be rectangular.

    ``causal`` is bottom-right aligned per sequence, as flash-attn >= 2.1: the last query of a
    sequence sees all its keys, and when a sequence has more queries than keys its first
    queries see none (their output is 0). With equal lengths this is the usual causal mask.
    """
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    cu_k = cu_q if cu_seqlens_k is None else check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(
            f"cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_k has "
            f"{cu_k.numel() - 1}; they must describe the same batch"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    cu_k = cu_k.to(cu_q.device)

    def tables(cu: Tensor) -> tuple[Tensor, Tensor]:
        """Per packed position: its sequence, and its distance to that sequence's end (>= 1)."""
        batch = torch.arange(cu.numel() - 1, device=cu.device)
        seq = torch.repeat_interleave(batch, cu.diff())
        to_end = cu[1:][seq] - torch.arange(seq.numel(), device=cu.device)
        return seq, to_end

    seq_q, end_q = tables(cu_q)
    seq_k, end_k = tables(cu_k)

    def mod(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        same = seq_q.to(q.device)[q] == seq_k.to(k.device)[k]
        if not causal:
            return same
        # Bottom-right: key j of a sequence is visible to query i iff j - len_k <= i - len_q,
        # i.e. the key is at least as far from its sequence's end as the query.
        return same & (end_k.to(k.device)[k] >= end_q.to(q.device)[q])

    name = "varlen(causal)" if causal else "varlen"
    return VarlenMask(
        seq_q.numel(), seq_k.numel(), mod, name, None, cu_q.device, cu_q, cu_k, causal
    )


@dataclass(frozen=True, repr=False, eq=False)
class VarlenMask(Mask):
    """A `varlen` mask that knows its sequences, so its block structure comes from
    ``cu_seqlens`` in O(tiles) instead of evaluating every (query, key) pair: a packed batch
    can be long. Combined with other masks it becomes a plain `Mask`."""

    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    causal: bool = False

    def block_structure(self, block_q: int, block_k: int) -> Tensor:
        """As `Mask.block_structure`, computed per tile from the sequence boundaries.

        A tile between query block [q0, q1) and key block [k0, k1) can only see sequences
        lo..hi that have rows in both. A sequence strictly inside that range has its last
        query and first key in the tile, which see each other even when causal; only the two
        end sequences need their best pair (last query, first key in the tile) checked.
        """
        if block_q <= 0 or block_k <= 0:
            raise ValueError(f"block sizes must be positive, got {block_q} and {block_k}")
        assert self.cu_seqlens_q is not None and self.cu_seqlens_k is not None
        cu_q, cu_k = self.cu_seqlens_q, self.cu_seqlens_k
        n_q, n_k = -(-self.q_len // block_q), -(-self.k_len // block_k)
        if n_q == 0 or n_k == 0:
            return torch.empty(1, n_q, n_k, dtype=torch.int8, device=self.device)
        batch = torch.arange(cu_q.numel() - 1, device=cu_q.device)
        seq_q = torch.repeat_interleave(batch, cu_q.diff())
        seq_k = torch.repeat_interleave(batch, cu_k.diff())
        q0 = torch.arange(n_q, device=cu_q.device) * block_q
        q1 = (q0 + block_q).clamp(max=self.q_len)
        k0 = torch.arange(n_k, device=cu_q.device) * block_k
        k1 = (k0 + block_k).clamp(max=self.k_len)
        first_q, last_q = seq_q[q0].unsqueeze(1), seq_q[q1 - 1].unsqueeze(1)  # (n_q, 1)
        first_k, last_k = seq_k[k0].unsqueeze(0), seq_k[k1 - 1].unsqueeze(0)  # (1, n_k)
        lo, hi = torch.maximum(first_q, first_k), torch.minimum(last_q, last_k)
        overlap = lo <= hi
        hi = torch.where(overlap, hi, lo)  # keep the indices below valid
        both = (cu_q.diff() > 0) & (cu_k.diff() > 0)
        count = torch.nn.functional.pad(both.cumsum(0), (1, 0))  # sequences < s with both

        if not self.causal:
            visible = overlap & (count[hi + 1] - count[lo] > 0)
            full = (first_q == last_q) & (first_k == last_k) & (first_q == first_k)
        else:

            def sees(s: Tensor) -> Tensor:
                """Sequence s: does its last query in the tile see its first key in the tile?"""
                query = torch.minimum(q1.unsqueeze(1), cu_q[s + 1]) - 1
                key = torch.maximum(k0.unsqueeze(0), cu_k[s])
                return both[s] & (cu_k[s + 1] - key >= cu_q[s + 1] - query)

            inside = count[hi] - count[(lo + 1).clamp(max=hi)] > 0
            visible = overlap & (inside | sees(lo) | sees(hi))
            # Full when one sequence fills the tile and its first query sees its last key.
            end_q = cu_q[seq_q[q0] + 1] - q0
            end_k = cu_k[seq_k[k1 - 1] + 1] - (k1 - 1)
            same = (first_q == last_q) & (first_k == last_k) & (first_q == first_k)
            full = same & (end_k.unsqueeze(0) >= end_q.unsqueeze(1))
        structure = torch.where(full, FULL, torch.where(visible, PARTIAL, EMPTY))
        return structure.to(torch.int8).unsqueeze(0)
