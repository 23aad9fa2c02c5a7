"""Attention masks: one type, one polarity, with its block structure.

A `Mask` says which keys each query may see: boolean **True = may attend**. It is stored
as a small function of positions, FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``, rather
than an N×N tensor: masks compose with ``&``, ``|`` and ``~``, a dense tensor is built only
when a kernel asks for one, and a kernel asks instead which tiles are empty, full or partial.

That block structure is computed once per tile size and cached on the mask, so a model
builds its mask once per batch and every layer reuses it. The built-in kinds (causal,
sliding window, padding, varlen) derive it from their parameters in O(tiles); ``&``, ``|``
and ``~`` combine their operands' structures tile by tile and evaluate only the tiles that
both leave partial; a mask written as a function (`from_function`) is evaluated one row of
tiles at a time, never as a whole N×N tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "Mask",
    "MaskMod",
    "VarlenMask",
    "causal",
    "documents",
    "from_function",
    "padding",
    "sliding_window",
    "varlen",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``mask_mod(b (B,1,1,1), h (1,H,1,1), q_idx (1,1,Q,1), kv_idx (1,1,1,K)) -> bool``, broadcast
to (B|1, H|1, Q|1, K|1): FlexAttention's and transformers' signature, on index tensors."""

EMPTY = 0
"""A tile of the block structure where no query may attend to any key: kernels skip it."""
PARTIAL = 1
"""A tile where some pairs may attend and some not: kernels apply the mask there."""
FULL = 2
"""A tile where every pair may attend: kernels drop the mask there."""
ALIGNMENTS = ("top-left", "bottom-right")


def _check_blocks(block_q: object, block_k: object) -> None:
    for value in (block_q, block_k):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"block sizes must be positive ints, got {block_q} and {block_k}")


def classify(allowed: Tensor, block_q: int, block_k: int) -> Tensor:
    """EMPTY / PARTIAL / FULL per (block_q × block_k) tile of a boolean (B, H, q, k) tensor.

    Positions past the tensor's end (the last tiles' padding) count as neither allowed nor
    blocked, so an edge tile is FULL when all its real positions are allowed.
    """
    batch, heads, q_len, k_len = allowed.shape
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    pad = (0, n_k * block_k - k_len, 0, n_q * block_q - q_len)
    shape = (batch, heads, n_q, block_q, n_k, block_k)
    any_allowed = torch.nn.functional.pad(allowed, pad, value=False).view(shape).any(5).any(3)
    all_allowed = torch.nn.functional.pad(allowed, pad, value=True).view(shape).all(5).all(3)
    return torch.where(all_allowed, FULL, torch.where(any_allowed, PARTIAL, EMPTY)).to(torch.int8)


@dataclass(frozen=True, eq=False)
class Mask:
    """Which keys each query may attend to, as a function of positions.

    ``batch`` / ``heads`` are None when the mask is the same for every batch element / head
    (causal, sliding window), else the size it was built for (padding, documents, a
    ``mask_mod`` that reads the head).
    """

    q_len: int
    k_len: int
    mask_mod: MaskMod
    name: str
    batch: int | None = None
    heads: int | None = None
    device: torch.device | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- evaluating ------------------------------------------------------------------------
    def indices(
        self, q_start: int, q_stop: int, k_start: int, k_stop: int, device=None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(b, h, q_idx, kv_idx) index tensors for a tile, shaped for broadcasting."""
        device = device or self.device
        b = torch.arange(1 if self.batch is None else self.batch, device=device)
        h = torch.arange(1 if self.heads is None else self.heads, device=device)
        q = torch.arange(q_start, q_stop, device=device)
        k = torch.arange(k_start, k_stop, device=device)
        return b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), q.view(1, 1, -1, 1), k.view(1, 1, 1, -1)

    def evaluate(self, q_start: int, q_stop: int, k_start: int, k_stop: int, device=None) -> Tensor:
        """The mask over queries [q_start, q_stop) × keys [k_start, k_stop): bool
        (batch|1, heads|1, q|1, k|1), as broadcast by the ``mask_mod`` (expand to use)."""
        out = self.mask_mod(*self.indices(q_start, q_stop, k_start, k_stop, device))
        if out.dtype != torch.bool:
            raise TypeError(f"mask_mod of {self.name} returned {out.dtype}, expected torch.bool")
        return out.reshape((1,) * (4 - out.ndim) + tuple(out.shape))

    def to_dense(self, device: torch.device | str | None = None) -> Tensor:
        """The boolean tensor of shape (batch|1, heads|1, q_len, k_len); True = may attend."""
        device = torch.device(device) if device is not None else None
        dense = self.evaluate(0, self.q_len, 0, self.k_len, device)
        return dense.expand(*dense.shape[:2], self.q_len, self.k_len)

    # -- block structure -------------------------------------------------------------------
    def block_structure(self, block_q: int, block_k: int) -> Tensor:
        """EMPTY / PARTIAL / FULL for each (block_q × block_k) tile: int8 of shape
        (batch|1, heads|1, ceil(q_len/block_q), ceil(k_len/block_k)).

        Computed once per tile size and cached, on the CPU whatever the mask's device (kernels
        plan their loops from it). A kernel skips EMPTY tiles and drops the mask on FULL ones.
        """
        _check_blocks(block_q, block_k)
        key = ("structure", block_q, block_k)
        if key not in self._cache:
            self._cache[key] = self._structure(block_q, block_k).cpu()
        return self._cache[key]

    def tiles(self, block_q: int, block_k: int) -> Tensor:
        """`block_structure` over the whole batch and every head, (n_q, n_k), cached: a tile
        is EMPTY only if it is empty for every batch element and head, FULL only if full."""
        key = ("tiles", block_q, block_k)
        if key not in self._cache:
            per = self.block_structure(block_q, block_k).flatten(0, 1)
            self._cache[key] = torch.where(
                (per == EMPTY).all(0), EMPTY, torch.where((per == FULL).all(0), FULL, PARTIAL)
            ).to(torch.int8)
        return self._cache[key]

    def _structure(self, block_q: int, block_k: int) -> Tensor:
        """Every (query, key) pair evaluated, one row of tiles at a time."""
        n_q, n_k = -(-self.q_len // block_q), -(-self.k_len // block_k)
        batch = 1 if self.batch is None else self.batch  # a batch of 0 stays 0
        heads = 1 if self.heads is None else self.heads
        out = torch.empty(batch, heads, n_q, n_k, dtype=torch.int8, device=self.device)
        for i in range(n_q):
            q0, q1 = i * block_q, min((i + 1) * block_q, self.q_len)
            rows = self.evaluate(q0, q1, 0, self.k_len)
            rows = rows.expand(batch, heads, q1 - q0, self.k_len)
            out[:, :, i : i + 1] = classify(rows, block_q, block_k)
        return out

    # -- algebra ---------------------------------------------------------------------------
    def _check_operand(self, other: object) -> Mask:
        if not isinstance(other, Mask):
            raise TypeError(f"can only combine a Mask with a Mask, got {type(other).__name__}")
        if (self.q_len, self.k_len) != (other.q_len, other.k_len):
            raise ValueError(
                f"cannot combine masks of different sizes: {self.name} is "
                f"{self.q_len}x{self.k_len}, {other.name} is {other.q_len}x{other.k_len}"
            )
        for what in ("batch", "heads"):
            mine, theirs = getattr(self, what), getattr(other, what)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"cannot combine masks built for different {what} sizes: {self.name} "
                    f"has {mine}, {other.name} has {theirs}"
                )
        return other

    def __and__(self, other: Mask) -> Mask:
        return Combined.of(self, self._check_operand(other), "&")

    def __or__(self, other: Mask) -> Mask:
        return Combined.of(self, self._check_operand(other), "|")

    def __invert__(self) -> Mask:
        return Inverted.of(self)

    def __repr__(self) -> str:
        extra = "".join(
            f", {what}={getattr(self, what)}"
            for what in ("batch", "heads")
            if getattr(self, what) is not None
        )
        return f"Mask({self.name}, {self.q_len}x{self.k_len}{extra})"


def _or_none(a: int | None, b: int | None) -> int | None:
    return a if a is not None else b


@dataclass(frozen=True, eq=False, repr=False)
class Combined(Mask):
    """``left & right`` or ``left | right``, keeping both operands' block structures."""

    left: Mask | None = None
    right: Mask | None = None
    op: str = "&"

    @staticmethod
    def of(left: Mask, right: Mask, op: str) -> Combined:
        first, second = left.mask_mod, right.mask_mod
        if op == "&":

            def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return first(b, h, q, k) & second(b, h, q, k)
        else:

            def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                return first(b, h, q, k) | second(b, h, q, k)

        return Combined(
            left.q_len,
            left.k_len,
            mod,
            f"({left.name} {op} {right.name})",
            _or_none(left.batch, right.batch),
            _or_none(left.heads, right.heads),
            left.device or right.device,
            left=left,
            right=right,
            op=op,
        )

    def _structure(self, block_q: int, block_k: int) -> Tensor:
        """Tile by tile from the operands': for ``&`` an EMPTY operand decides and a FULL
        one leaves the other's answer (``|``: the reverse). Only tiles that both operands
        leave PARTIAL are evaluated (along a diagonal, a padding edge: a few per row)."""
        assert self.left is not None and self.right is not None
        a = self.left.block_structure(block_q, block_k)
        b = self.right.block_structure(block_q, block_k)
        a, b = torch.broadcast_tensors(a, b)
        decides, passes = (EMPTY, FULL) if self.op == "&" else (FULL, EMPTY)
        out = torch.where(a == passes, b, torch.where(b == passes, a, PARTIAL))
        out = torch.where((a == decides) | (b == decides), decides, out).to(torch.int8)
        out = out.expand(
            1 if self.batch is None else self.batch,
            1 if self.heads is None else self.heads,
            *out.shape[2:],
        ).clone()
        both = ((a == PARTIAL) & (b == PARTIAL)).flatten(0, 1).any(0)
        for i, j in both.nonzero().tolist():
            q0, k0 = i * block_q, j * block_k
            q1, k1 = min(q0 + block_q, self.q_len), min(k0 + block_k, self.k_len)
            tile = self.evaluate(q0, q1, k0, k1).expand(*out.shape[:2], q1 - q0, k1 - k0)
            exact = classify(tile, block_q, block_k)[..., 0, 0].cpu()
            out[..., i, j] = torch.where(out[..., i, j] == PARTIAL, exact, out[..., i, j])
        return out


@dataclass(frozen=True, eq=False, repr=False)
class Inverted(Mask):
    """``~mask``: its structure is the operand's with EMPTY and FULL swapped."""

    operand: Mask | None = None

    @staticmethod
    def of(operand: Mask) -> Inverted:
        mod = operand.mask_mod
        return Inverted(
            operand.q_len,
            operand.k_len,
            lambda b, h, q, k: ~mod(b, h, q, k),
            f"~{operand.name}",
            operand.batch,
            operand.heads,
            operand.device,
            operand=operand,
        )

    def _structure(self, block_q: int, block_k: int) -> Tensor:
        assert self.operand is not None
        inner = self.operand.block_structure(block_q, block_k)
        return (FULL - inner).to(torch.int8)  # EMPTY ↔ FULL, PARTIAL stays


def from_function(
    mask_mod: MaskMod,
    q_len: int,
    k_len: int | None = None,
    *,
    batch: int | None = None,
    heads: int | None = None,
    device: torch.device | str | None = None,
    name: str | None = None,
) -> Mask:
    """A mask from a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

    The function is called on broadcast index tensors, b (B,1,1,1), h (1,H,1,1),
    q_idx (1,1,Q,1), kv_idx (1,1,1,K), so plain tensor expressions work, as in
    FlexAttention and transformers' mask functions; ``batch`` / ``heads`` give the ranges
    of b and h when the mask depends on them (else b and h are 0). Its block structure is
    computed once per tile size, one row of tiles at a time.
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    k_len = q_len if k_len is None else k_len
    _check_len("q_len", q_len)
    _check_len("k_len", k_len)
    for what, value in (("batch", batch), ("heads", heads)):
        if value is not None:
            _check_len(what, value)
    device = torch.device(device) if device is not None else None
    label = name or getattr(mask_mod, "__name__", "mask_mod")
    return Mask(q_len, k_len, mask_mod, label, batch, heads, device)


@dataclass(frozen=True, eq=False, repr=False)
class BandMask(Mask):
    """A causal or sliding-window mask: query q may see key k when 0 <= q + offset - k < window.

    Its block structure follows from the band's edges in O(tiles), without evaluating every
    (query, key) pair, which is most of the cost of skipping tiles on a long sequence.
    """

    offset: int = 0
    window: int | None = None
    translation_invariant: ClassVar[bool] = True  # whether q may see k depends on q − k only

    def _structure(self, block_q: int, block_k: int) -> Tensor:
        """A tile is empty when the band misses it, full when the band covers it."""
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
        return structure.to(torch.int8).view(1, 1, *structure.shape)


@dataclass(frozen=True, eq=False, repr=False)
class PaddingMask(Mask):
    """Key padding: its block structure follows from the lengths in O(batch × tiles)."""

    lengths: Tensor | None = None

    def _structure(self, block_q: int, block_k: int) -> Tensor:
        assert self.lengths is not None
        n_q = -(-self.q_len // block_q)
        k0 = torch.arange(0, self.k_len, block_k, device=self.lengths.device)
        k1 = (k0 + block_k).clamp(max=self.k_len)
        length = self.lengths.view(-1, 1)
        per_key_block = torch.where(
            k1 <= length, FULL, torch.where(k0 < length, PARTIAL, EMPTY)
        ).to(torch.int8)  # (batch, n_k)
        return per_key_block.view(-1, 1, 1, k0.numel()).expand(-1, 1, n_q, -1).clone()


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


def _offset(q_len: int, k_len: int, align: str) -> int:
    _check_len("q_len", q_len)
    _check_len("k_len", k_len)
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    return 0 if align == "top-left" else k_len - q_len


def causal(q_len: int, k_len: int | None = None, *, align: str = "top-left") -> Mask:
    """Each query sees only keys at or before its own position.

    ``top-left``: query i sees keys 0..i (training, q_len == k_len).
    ``bottom-right``: the last query sees every key; query i sees keys
    0..i + (k_len - q_len) (decoding new queries after a cache of earlier keys).
    """
    k_len = q_len if k_len is None else k_len
    offset = _offset(q_len, k_len, align)
    return BandMask(
        q_len,
        k_len,
        lambda b, h, q, k: k <= q + offset,
        "causal" if align == "top-left" else "causal(bottom-right)",
        offset=offset,
    )


def sliding_window(
    q_len: int, k_len: int | None = None, *, window: int, align: str = "top-left"
) -> Mask:
    """Causal attention to the last ``window`` keys only (the query's own key included).

    ``window`` is keyword-only: ``sliding_window(64, 16)`` would otherwise read as k_len 16.
    """
    k_len = q_len if k_len is None else k_len
    _check_len("window", window)
    if window == 0:
        raise ValueError("window must be >= 1, got 0")
    offset = _offset(q_len, k_len, align)
    return BandMask(
        q_len,
        k_len,
        lambda b, h, q, k: (k <= q + offset) & (k > q + offset - window),
        f"sliding_window({window})",
        offset=offset,
        window=window,
    )


def padding(
    lengths: Tensor | list[int], max_len: int | None = None, *, q_len: int | None = None
) -> Mask:
    """Key padding: in batch element b only the first ``lengths[b]`` keys are real.

    ``q_len`` defaults to ``max_len`` (self-attention over the same padded batch).
    """
    lengths = _as_int_tensor("lengths", lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (batch,), got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    # The range check reads the lengths on the host: inside a compiled graph (given
    # max_len) it is skipped, as the models skip their token-id range check there.
    if max_len is None or not torch.compiler.is_compiling():
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
        longest = int(lengths.max()) if lengths.numel() else 0
        max_len = longest if max_len is None else max_len
        _check_len("max_len", max_len)
        if longest > max_len:
            raise ValueError(f"lengths must be <= max_len={max_len}, got a length of {longest}")
    _check_len("max_len", max_len)
    q_len = max_len if q_len is None else q_len
    _check_len("q_len", q_len)
    return PaddingMask(
        q_len,
        max_len,
        lambda b, h, q, k: k < lengths.to(k.device)[b],
        "padding",
        batch=lengths.numel(),
        device=lengths.device,
        lengths=lengths,
    )


def documents(doc_ids: Tensor | list[int] | list[list[int]]) -> Mask:
    """Block-diagonal mask for packed sequences: a token sees only tokens of its document.

    ``doc_ids`` is (seq,) or (batch, seq): the document each position belongs to.
    Combine with ``causal`` for packed causal language modelling. When each document is one
    contiguous run (the usual packing), the block structure follows from the runs' bounds
    in O(tiles); ids that come back after another document are evaluated pairwise.
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

    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        table = ids.to(q.device)  # (batch|1, seq)
        row = b if batch is not None else b * 0  # elementwise, so Flex can call it per score
        return table[row, q] == table[row, k]

    # The runs (read on the host) serve the block structure, which no kernel asks for inside
    # a compiled graph (Flex evaluates the mask there).
    runs = None if torch.compiler.is_compiling() else _document_runs(ids)
    return DocumentsMask(seq, seq, mod, "documents", batch=batch, device=ids.device, runs=runs)


def _document_runs(ids: Tensor) -> tuple[Tensor, ...] | None:
    """Per row, the cumulative bounds of its documents, if each is one contiguous run."""
    runs = []
    for row in ids.cpu():
        values, counts = torch.unique_consecutive(row, return_counts=True)
        if values.numel() != torch.unique(values).numel():
            return None  # a document id comes back: not block-diagonal by runs
        runs.append(torch.nn.functional.pad(counts.cumsum(0), (1, 0)))
    return tuple(runs)


@dataclass(frozen=True, eq=False, repr=False)
class DocumentsMask(Mask):
    """`documents`: block-diagonal by runs; the structure of each batch row is that of the
    varlen mask of its runs."""

    runs: tuple[Tensor, ...] | None = None

    def _structure(self, block_q: int, block_k: int) -> Tensor:
        if not self.runs:  # ids that come back, or a batch of none
            return super()._structure(block_q, block_k)
        rows = [varlen(bounds)._structure(block_q, block_k) for bounds in self.runs]
        return torch.cat(rows, dim=0)


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

    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        same = seq_q.to(q.device)[q] == seq_k.to(k.device)[k]
        if not causal:
            return same
        # Bottom-right: key j of a sequence is visible to query i iff j - len_k <= i - len_q,
        # i.e. the key is at least as far from its sequence's end as the query.
        return same & (end_k.to(k.device)[k] >= end_q.to(q.device)[q])

    name = "varlen(causal)" if causal else "varlen"
    return VarlenMask(
        seq_q.numel(),
        seq_k.numel(),
        mod,
        name,
        device=cu_q.device,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        causal=causal,
    )


@dataclass(frozen=True, eq=False, repr=False)
class VarlenMask(Mask):
    """A `varlen` mask that knows its sequences, so its block structure comes from
    ``cu_seqlens`` in O(tiles) instead of evaluating every (query, key) pair: a packed batch
    can be long."""

    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    causal: bool = False

    def _structure(self, block_q: int, block_k: int) -> Tensor:
        """The tiles' structure from the sequence boundaries.

        A tile between query block [q0, q1) and key block [k0, k1) can only see sequences
        lo..hi that have rows in both. A sequence strictly inside that range has its last
        query and first key in the tile, which see each other even when causal; only the two
        end sequences need their best pair (last query, first key in the tile) checked.
        """
        assert self.cu_seqlens_q is not None and self.cu_seqlens_k is not None
        cu_q, cu_k = self.cu_seqlens_q, self.cu_seqlens_k
        n_q, n_k = -(-self.q_len // block_q), -(-self.k_len // block_k)
        if n_q == 0 or n_k == 0:
            return torch.empty(1, 1, n_q, n_k, dtype=torch.int8, device=self.device)
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
        return structure.to(torch.int8).view(1, 1, n_q, n_k)
