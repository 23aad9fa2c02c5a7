"""What every kernel receives: one validated attention request."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..masks import Mask
from ..score_mods import ScoreMod


@dataclass(frozen=True)
class Request:
    """A validated call of `multihead.attention`, in the library's layout.

    query (batch, heads, q_len, head_dim); key (batch, kv_heads, k_len, head_dim);
    value (batch, kv_heads, k_len, value_dim).

    The mask comes in two parts: ``structured``, every `Mask` of the call and the causal
    mask combined (kernels that tile evaluate it per block and skip empty blocks), and
    ``bias``, a tensor mask the caller passed (bool True = may attend, or float additive),
    (batch|1, heads|1, q_len, k_len). ``is_causal`` is set when the whole mask is the plain
    top-left causal one, so kernels with a causal fast path can take it.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    structured: Mask | None
    bias: Tensor | None
    is_causal: bool
    scale: float
    dropout_p: float
    score_mod: ScoreMod | None
    return_weights: bool

    @property
    def num_heads(self) -> int:
        """Query heads."""
        return self.query.shape[1]

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (fewer than query heads under grouped-query attention)."""
        return self.key.shape[1]

    @property
    def q_len(self) -> int:
        """Query positions."""
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        """Key positions."""
        return self.key.shape[2]

    _dense: list[Tensor | None] = field(default_factory=list, repr=False, compare=False)

    @property
    def mask(self) -> Tensor | None:
        """The whole mask as one dense tensor (bool, or float when a bias was given), built
        on first use (the tiled kernel never asks) and kept (a list, not functools'
        cached_property, whose lock torch.compile cannot trace).

        None when there is no mask, or when ``is_causal`` (the fast path needs no tensor).
        """
        if self.is_causal or self.structured is None:
            return self.bias
        if not self._dense:
            allowed = self.structured.to_dense(self.query.device)
            self._dense.append(combine_masks(allowed, self.bias))
        return self._dense[0]


def combine_masks(allowed: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """The one place a structured mask's tensor (bool, True = may attend) and a tensor mask
    (bool, or a float bias to add) become one: bool when both are bool, else a float bias
    with −inf where ``allowed`` is False. Shapes broadcast; None is "no mask"."""
    if allowed is None or bias is None:
        return allowed if bias is None else bias
    if bias.dtype == torch.bool:
        return bias & allowed
    return bias.masked_fill(~allowed, -torch.inf)


# -- Non-finite input ------------------------------------------------------------------------
# torch's fused kernels treat a row whose visible scores are all NaN as fully masked and
# return 0 for it, and they apply a boolean mask as a -inf bias, so NaN + -inf lets a masked
# NaN key reach every row (and their backward multiplies masked entries by 0: NaN again).
# The fused kernels therefore run on inputs whose NaN rows are zeroed, where that matters,
# and make NaN the output rows that the float64 reference makes NaN. All of it is tensor
# ops on per-row flags (a sum per row, a product of the mask with the key flags): no host
# read, no branch on values.


def _row_sums(x: Tensor) -> Tensor:
    """Sum over the feature dim, in fp32 for fp16/bf16 (a low-precision row cannot overflow
    it): one pass, the cheapest reduction."""
    return x.sum(-1, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None)


def _per_query_head(flags: Tensor, num_heads: int) -> Tensor:
    """(batch, kv_heads, n) → (batch, heads, n): each key/value head's flags for its query
    group (a view when there is one query head per key/value head)."""
    batch, kv_heads, n = flags.shape
    return (
        flags.unsqueeze(2)
        .expand(batch, kv_heads, num_heads // kv_heads, n)
        .reshape(batch, num_heads, n)
    )


def bad_queries(query: Tensor) -> Tensor:
    """(batch, heads, q_len) bool: query rows holding NaN or inf. Their output rows are NaN
    in every kernel, whatever the mask (even a row that sees no key)."""
    # Not (sum · 0).isnan(): torch.compile folds x·0 to 0 and the flags with it.
    return ~_row_sums(query).isfinite()


def nan_keys(key: Tensor) -> Tensor:
    """(batch, kv_heads, k_len) bool: key rows holding NaN. Every query that sees such a key
    gets a NaN output row. (A key holding +inf beside -inf, whose scores are mostly NaN, is
    flagged too; one holding inf beside NaN keeps its inf through `clean_keys` (not through
    `zero_rows`): under a boolean mask both may also make NaN a row that cannot see them,
    where the reference is finite.)"""
    return _row_sums(key).isnan()


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will differentiate through these tensors (a flag, not a value)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _ZeroNonFinite(torch.autograd.Function):
    """NaN entries (and ±inf ones unless kept) set to 0, elementwise: a pass without the
    broadcast mask of a masked_fill, about twice as fast. The gradient passes through as
    it comes (no copy): a zeroed entry reaches only output rows that are NaN, so a loss
    that leaves those out sends it none."""

    @staticmethod
    def forward(ctx, x: Tensor, keep_inf: bool) -> Tensor:
        infinity = math.inf if keep_inf else 0.0
        return x.nan_to_num(0.0, infinity, -infinity)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def clean_queries(query: Tensor) -> Tensor:
    """The query with NaN/inf entries set to 0 (their rows are `bad_queries`, NaN anyway),
    so that no 0·NaN carries them to other rows through a fused kernel's backward."""
    return _ZeroNonFinite.apply(query, False)


def clean_keys(key: Tensor) -> Tensor:
    """The key with NaN entries set to 0 (their rows are `nan_keys`): what a fused kernel
    may see of them. An inf stays, as the reference sees it."""
    return _ZeroNonFinite.apply(key, True)


class _ZeroRows(torch.autograd.Function):
    """Whole rows set to 0; the gradient passes through as it comes (see `_ZeroNonFinite`)."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor) -> Tensor:
        return torch.where(rows.unsqueeze(-1), 0.0, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def zero_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x`` (batch, heads, n, features) with the rows flagged in ``rows`` (batch, heads, n)
    set to 0, whole: what a fused kernel may see of a row that `bad_queries` or `nan_keys`
    flags (the output rows that see it are made NaN anyway).

    The copy comes out contiguous (batch, heads, n, features), as the flags are, whatever
    the layout of ``x``. Heads split from one projection are strided views (a row every
    3·embed_dim floats), which SDPA's CPU kernels read markedly slower, backward most: on
    the contiguous copy the forward and backward together win back more than the copy costs.
    """
    return _ZeroRows.apply(x, rows)


def nan_rows(x: Tensor, rows: Tensor, in_place: bool) -> Tensor:
    """``x`` (..., n, features) with the rows flagged in ``rows`` (..., n) made NaN, by adding
    0 or NaN to each row: a broadcast add, several times cheaper than masked_fill. The
    gradient passes through unchanged: a loss that leaves the NaN rows out (a mask,
    nansum) sends them none, and the other rows' gradients stay exact.

    A (batch, heads, n, features) ``x`` laid out (batch, n, heads, features), as SDPA leaves
    heads split from one projection, gets the add in that order: a compiled graph then
    writes the result in that layout too (in place when it can), and merging the heads stays
    a view instead of a second pass.
    """
    poison = torch.where(rows, math.nan, 0.0).to(x.dtype).unsqueeze(-1)
    heads_inside = x.ndim == 4 and x.stride(1) < x.stride(2)
    if heads_inside:
        x, poison = x.transpose(1, 2), poison.transpose(1, 2)
    x = x.add_(poison) if in_place else x + poison
    return x.transpose(1, 2) if heads_inside else x


def rows_broken_without_mask(query: Tensor, key: Tensor) -> Tensor:
    """(batch, heads, q_len) bool: the rows that a fused kernel run without a mask tensor
    (none, or top-left causal) turns into 0 but the reference makes NaN.

    A query row holding NaN/inf; or key 0 holding NaN. A row whose visible keys mix NaN
    and numbers is NaN already: a fused kernel returns 0 only where every visible key is
    NaN, and then so is key 0, which every row sees. A sum over each query row and over
    key 0, none over the other keys: it keeps a decoding step cheap.
    """
    kv_heads = key.shape[1]
    first_key = nan_keys(key[..., :1, :])  # (B, kv_heads, 1)
    from_query = bad_queries(query).unflatten(1, (kv_heads, -1))  # (B, kv_heads, group, Lq)
    return (from_query | first_key.unsqueeze(2)).flatten(1, 2)


def rows_seeing(keys: Tensor, mask: Tensor | None, num_heads: int) -> Tensor:
    """(batch, heads, q_len or 1) bool: the query rows whose visible keys include a flagged one.

    ``keys`` (batch, kv_heads, k_len) flags keys; ``mask`` is None (every key is visible:
    the result is one row per head), a float bias (batch|1, heads|1, q_len, k_len), added
    (NaN + bias is NaN: every key counts as seen, as in the reference; a row of the bias
    holding NaN or +inf is flagged too), or bool of that shape, True = may attend. A bool
    mask costs one matrix product with the flags (the dims the mask broadcasts over become
    its columns, so the mask is never expanded).
    """
    flags = _per_query_head(keys, num_heads)  # (B, H, K)
    if mask is None:
        return flags.any(-1, keepdim=True)
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # a 2-D mask is (Q, K)
    if mask.dtype != torch.bool:
        bias_sums = _row_sums(mask)  # NaN or +inf exactly where a row holds NaN or +inf
        return flags.any(-1, keepdim=True) | bias_sums.isnan() | (bias_sums == torch.inf)
    batch, heads, k_len = flags.shape
    mb, mh, q_len = mask.shape[0], mask.shape[1], mask.shape[2]
    cols = flags.to(torch.float32).view(mb, batch // mb, mh, heads // mh, k_len)
    cols = cols.permute(0, 2, 4, 1, 3).reshape(mb, mh, k_len, -1)  # (mb, mh, K, columns)
    seen = mask.to(torch.float32) @ cols  # (mb, mh, Q, columns): flagged keys each row sees
    seen = seen.view(mb, mh, q_len, batch // mb, heads // mh).permute(0, 3, 1, 4, 2)
    return seen.reshape(batch, heads, q_len) > 0


def causal_rows_seeing(keys: Tensor, q_len: int, num_heads: int) -> Tensor:
    """`rows_seeing` under the top-left causal mask (query i sees keys 0..i), from a
    running count over the keys: no mask is built."""
    flags = _per_query_head(keys, num_heads)
    seen_up_to = flags.cumsum(-1) > 0  # (B, H, K): a flagged key at or before k
    if q_len <= keys.shape[-1]:  # query i sees keys 0..i
        return seen_up_to[..., :q_len]
    last = torch.arange(q_len, device=keys.device).clamp(max=keys.shape[-1] - 1)
    return seen_up_to[..., last]
