"""`multihead.attention` as a Hugging Face transformers attention implementation.

    from multihead.integrations import huggingface
    huggingface.register()  # once: then any model can take attn_implementation="multihead"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multihead")

transformers builds one mask per forward and layer type by calling the mask function
registered under the implementation's name, then hands that mask to every layer of the type.
`register` installs `structured_mask` there: it reads transformers' own mask functions
(causal, sliding window, chunked, bidirectional, padding; each a FlexAttention-style
``mask_function(b, h, q_idx, kv_idx)``) and builds the same mask as a `multihead.masks.Mask`
from the analytic kinds (`masks.causal`/`masks.sliding_window` bands, `masks.padding`,
`masks.varlen` for chunks), so its block structure costs O(tiles), is computed once and is
cached on the mask, which every layer shares. Anything it does not recognise becomes
`masks.from_function(mask_function)`, exact and still block-skipping. The attention function
(`attention_forward`) gives the `Mask` to `multihead.attention`, whose ``auto`` runs the tiled
kernel, skipping the tiles the mask leaves empty, when it is sparse enough. Grouped-query keys
and values go in with their own head count (no copies).

This module is plain torch: transformers is imported by `register` (and by `structured_mask`
when it runs), so `import multihead` never pulls it in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import masks
from ..functional import KernelArg, attention
from ..kernels import KERNELS
from ..kernels.base import combine_masks
from ..masks import Mask

__all__ = ["attention_forward", "register", "structured_mask"]

INSTALL_HINT = "pip install multihead[hf]"
# transformers treats "org/repo" names as hub kernels and "paged|x" as paged attention, and
# "eager" is its own fallback: none of them can name this implementation.
_RESERVED = ("eager",)


def attention_forward(
    module: nn.Module | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Mask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    *,
    kernel: KernelArg = "auto",
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature, computed by `multihead.attention`.

    Args:
        module: the calling attention layer; its ``is_causal`` and ``training`` are read.
        query: (batch, heads, q_len, head_dim).
        key, value: (batch, kv_heads, k_len, head_dim); kv_heads divides heads (GQA).
        attention_mask: None, the `Mask` that `structured_mask` built, a bool mask (True =
            may attend) or an additive float mask, (batch|1, heads|1, q_len, k_len).
        dropout: dropout on the weights; applied only while ``module`` is training.
        scaling: score scale, default 1/sqrt(head_dim).
        is_causal: overrides ``module.is_causal``; used only when there is no mask, since
            a mask from transformers already holds the causal part (with the cache offset).
        softcap: logit soft-capping (Gemma 2).
        kernel: "auto", "sdpa", "reference" or "tiled".
        **kwargs: ``position_bias`` (T5-style additive bias) is added to the mask;
            ``output_attentions`` asks for the weights (the reference kernel returns them);
            ``sliding_window`` is already in the mask; attention sinks (``s_aux``) are
            refused.

    Returns:
        (attn_output (batch, q_len, heads, head_dim), attn_weights or None), as transformers
        expects.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            "s_aux (attention sinks) is not supported by multihead.attention; "
            "use attn_implementation='eager' for this model"
        )
    q_len = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers' sdpa: with no mask the causal flag decides, and a single query (a
    # decoding step after the cache) sees every key.
    causal = bool(is_causal) and attention_mask is None and q_len > 1
    mask = attention_mask
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        mask = _with_bias(mask, position_bias.to(query.dtype))
    training = getattr(module, "training", True)
    want_weights = bool(kwargs.get("output_attentions", False))
    result = attention(
        query,
        key,
        value,
        mask=mask,
        causal=causal,
        scale=float(scaling) if scaling is not None else None,
        dropout_p=float(dropout) if training else 0.0,
        softcap=float(softcap) if softcap is not None else None,
        return_weights=want_weights,
        kernel=kernel,
    )
    output, weights = result if want_weights else (result, None)
    return output.transpose(1, 2).contiguous(), weights


def _with_bias(mask: Mask | Tensor | None, bias: Tensor) -> Tensor:
    """One additive mask from a position bias (dense, learned per layer) and the mask."""
    if isinstance(mask, Mask):
        mask = mask.to_dense(bias.device)
    if mask is not None and mask.dtype != torch.bool:
        return bias + mask.to(bias.dtype)
    return combine_masks(mask, bias)  # type: ignore[return-value]


# -- the mask function --------------------------------------------------------------------


def structured_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int | Tensor = 0,
    mask_function: Callable[..., Tensor] | None = None,
    attention_mask: Tensor | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Mask | None:
    """transformers' mask-interface signature (as its ``sdpa_mask``), returning a `Mask`.

    Query i sits at position ``q_offset + i`` and key j at ``kv_offset + j``; ``mask_function``
    says which positions see each other (default: causal), ``attention_mask`` (batch, ≥
    kv_offset + kv_length) which keys are real (0/False = padding). Returns None where the
    attention function needs no mask, as ``sdpa_mask`` does: a plain causal mask over a
    square, unpadded input (the kernels' causal fast path), or, when
    ``allow_is_bidirectional_skip``, a bidirectional one without padding.
    """
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    offset = q_offset - kv_offset  # query i sees key j when i + offset - j >= 0 (causal)
    device = torch.device(device)
    if mask_function is None:
        mask_function = _utils().causal_mask_function
    keep = _padding(attention_mask, batch_size, kv_length, kv_offset, device)
    causal, window, parts, rest = False, None, [], []
    for kind, value in _split(mask_function, q_offset, kv_offset):
        if kind == "causal":
            causal = True
        elif kind == "window":
            window = value if window is None else min(window, value)
        elif kind == "padding":
            more = _padding(value, batch_size, kv_length, kv_offset, device)
            keep = more if keep is None else keep if more is None else keep & more
        elif kind == "chunks":
            parts.append(value(q_length, kv_length))
        else:  # a mask function to evaluate
            rest.append(value)
    if window is not None and not causal:  # a window overlay alone is no band: evaluate it
        rest.append(_utils().sliding_window_overlay(window))
        window = None
    if window is not None and q_length - 1 + offset < window:
        window = None  # the window reaches past the first key: plain causal
    if causal:
        parts.insert(0, _band(q_length, kv_length, offset, window))
    if rest:
        mask_mod = _shifted(rest, q_offset, kv_offset)
        parts.append(
            masks.from_function(
                mask_mod, q_length, kv_length, batch=batch_size, device=device, name="mask_function"
            )
        )
    if keep is not None:
        parts.append(_padding_mask(keep, q_length, kv_length))
    if not parts:  # bidirectional, every key real
        if allow_is_bidirectional_skip:
            return None
        everything = torch.full((batch_size,), kv_length, device=device)
        return masks.padding(everything, kv_length, q_len=q_length)
    # As sdpa_mask: a plain causal mask is the kernels' fast path (the attention function
    # sets causal itself), and so is one query that sees every key.
    plain = causal and window is None and len(parts) == 1
    square = offset == 0 and q_length == kv_length
    sees_all = q_length == 1 and offset >= kv_length - 1
    if allow_is_causal_skip and plain and (square or sees_all):
        return None
    mask = parts[0]
    for part in parts[1:]:
        mask = mask & part
    return mask


@functools.cache
def _utils() -> Any:
    """transformers.masking_utils (imported on first use)."""
    from transformers import masking_utils

    return masking_utils


@functools.cache
def _known_codes() -> dict[Any, str]:
    """The code object of each mask function transformers builds, to recognise its closures."""
    utils = _utils()
    return {
        utils.causal_mask_function.__code__: "causal",
        utils.bidirectional_mask_function.__code__: "bidirectional",
        utils.and_masks(utils.causal_mask_function).__code__: "and",
        utils.sliding_window_overlay(1).__code__: "window",
        utils.chunked_overlay(1, torch.zeros(1)).__code__: "chunks",
        utils.padding_mask_function(torch.ones(1, 1, dtype=torch.bool)).__code__: "padding",
    }


def _closure(function: Callable[..., Any]) -> dict[str, Any]:
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (c.cell_contents for c in cells), strict=True))


def _split(function: Callable[..., Tensor], q_offset: int, kv_offset: int) -> list[tuple[str, Any]]:
    """The terms of an ``and_masks`` tree of transformers' mask functions, each as (kind,
    parameter): "causal", "window" (its size), "padding" (its 2-D mask), "chunks" (a builder of
    the `Mask`), or "function" (a mask function to evaluate: one not recognised). A
    bidirectional term allows everything and gives none."""
    kind = _known_codes().get(getattr(function, "__code__", None))
    cells = _closure(function) if kind else {}
    if kind == "and":
        return [
            term for part in cells["mask_functions"] for term in _split(part, q_offset, kv_offset)
        ]
    if kind == "causal":
        return [("causal", None)]
    if kind == "bidirectional":
        return []
    if kind == "window":
        return [("window", int(cells["sliding_window"]))]
    if kind == "padding":
        return [("padding", cells["padding_mask"])]
    if kind == "chunks":
        chunks = _chunks(int(cells["chunk_size"]), cells["left_padding"], q_offset, kv_offset)
        if chunks is not None:
            return [("chunks", chunks)]
    return [("function", function)]


def _shifted(
    functions: list[Callable[..., Tensor]], q_offset: int, kv_offset: int
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = functions[0](b, h, q + q_offset, k + kv_offset)
        for function in functions[1:]:
            out = out & function(b, h, q + q_offset, k + kv_offset)
        return out

    return mask_mod


def _band(q_len: int, k_len: int, offset: int, window: int | None) -> Mask:
    """Causal (``window`` None) or sliding-window: query i sees key j when
    0 <= i + offset - j < window. Bottom-right alignment is the usual cached case."""
    for align, aligned in (("top-left", 0), ("bottom-right", k_len - q_len)):
        if offset == aligned:
            if window is None:
                return masks.causal(q_len, k_len, align=align)
            return masks.sliding_window(q_len, k_len, window=window, align=align)
    # A static cache: keys past the queries are empty slots, hidden by the band.
    size = window

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        distance = q + offset - k
        return (distance >= 0) if size is None else (distance >= 0) & (distance < size)

    name = "causal" if window is None else f"sliding_window({window})"
    label = f"{name}, offset {offset}"
    return masks.BandMask(q_len, k_len, mask_mod, label, offset=offset, window=window)


def _padding(
    attention_mask: Tensor | None, batch: int, kv_length: int, kv_offset: int, device
) -> Tensor | None:
    """The keys that are real, (batch, kv_length) bool, or None when all are (as
    transformers' prepare_padding_mask: a mask shorter than the keys hides the rest)."""
    if attention_mask is None:
        return None
    keep = attention_mask.to(device=device, dtype=torch.bool)
    if keep.ndim != 2:
        raise ValueError(
            f"attention_mask must be 2-D (batch, keys) here, got shape {tuple(keep.shape)}"
        )
    missing = kv_offset + kv_length - keep.shape[-1]
    if missing > 0:
        keep = torch.nn.functional.pad(keep, (0, missing), value=False)
    keep = keep[:, kv_offset : kv_offset + kv_length].expand(batch, kv_length)
    return None if bool(keep.all()) else keep


def _padding_mask(keep: Tensor, q_len: int, k_len: int) -> Mask:
    """A key-padding `Mask` from (batch, k_len) bool: analytic (`masks.padding`, and its
    inverse for left padding) when each row's real keys are one run, else evaluated."""
    batch = keep.shape[0]
    positions = torch.arange(k_len, device=keep.device)
    start = torch.where(keep, positions, k_len).amin(-1)  # first real key (k_len: none)
    stop = torch.where(keep, positions + 1, 0).amax(-1)  # one past the last
    start = torch.minimum(start, stop)
    one_run = (keep.sum(-1) == stop - start).all()
    if not bool(one_run):
        table = keep
        return masks.from_function(
            lambda b, h, q, k: table[b, k], q_len, k_len, batch=batch, name="padding"
        )
    mask = None
    if bool((stop < k_len).any()):
        mask = masks.padding(stop, k_len, q_len=q_len)  # right padding: keys < stop
    if bool((start > 0).any()):
        left = ~masks.padding(start, k_len, q_len=q_len)  # left padding: keys >= start
        mask = left if mask is None else mask & left
    assert mask is not None  # some key is padding, else `_padding` gave None
    return mask


def _chunks(
    size: int, left_padding: Tensor, q_offset: int, kv_offset: int
) -> Callable[[int, int], Mask] | None:
    """Chunked attention (Llama 4): positions p and p' see each other when
    (p - pad) // size == (p' - pad) // size; as `masks.varlen` over the chunks, one sequence
    per chunk, when the left padding is the same in every row (else None: evaluated)."""
    pad = left_padding.reshape(-1)
    if pad.numel() == 0 or bool((pad != pad[0]).any()):
        return None
    shift = int(pad[0])

    def build(q_len: int, k_len: int) -> Mask:
        ids_q = torch.div(torch.arange(q_len) + q_offset - shift, size, rounding_mode="floor")
        ids_k = torch.div(torch.arange(k_len) + kv_offset - shift, size, rounding_mode="floor")
        first = int(min(ids_q.min(), ids_k.min())) if q_len and k_len else 0
        last = int(max(ids_q.max(), ids_k.max())) if q_len and k_len else 0
        count = last - first + 1

        def cumulative(ids: Tensor) -> Tensor:
            sizes = torch.bincount(ids - first, minlength=count)
            return torch.nn.functional.pad(sizes.cumsum(0), (1, 0))

        return masks.varlen(cumulative(ids_q), cumulative(ids_k))

    return build


# -- registering ---------------------------------------------------------------------------


@functools.cache
def _forward_for(kernel: str) -> functools.partial[tuple[Tensor, Tensor | None]]:
    """One function object per kernel, so registering again changes nothing."""
    return functools.partial(attention_forward, kernel=kernel)


def _transformers() -> tuple[Any, Any]:
    """AttentionInterface and AttentionMaskInterface, or a clear ImportError."""
    try:
        import transformers
        from transformers import masking_utils  # noqa: F401  (structured_mask reads it)
    except ImportError as error:
        raise ImportError(
            "multihead.integrations.huggingface needs transformers, which is not installed: "
            f"{INSTALL_HINT}"
        ) from error
    return transformers.AttentionInterface, transformers.AttentionMaskInterface


def register(name: str = "multihead", kernel: KernelArg = "auto") -> str:
    """Make ``attn_implementation=name`` run `multihead.attention` with ``kernel``.

    Registers the attention function and, under the same name, `structured_mask`, so that
    transformers builds one structured `Mask` per forward and layer type, which every
    layer shares and whose empty tiles the tiled kernel skips. Global for the process, like
    transformers' registry; calling it again with the same arguments changes nothing, and
    with another kernel replaces it. Returns ``name``, to pass on as ``attn_implementation``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name in _RESERVED or any(c in name for c in "/:|"):
        raise ValueError(
            f"name {name!r} is taken by transformers ('eager', or a hub kernel 'org/repo', "
            "or a 'paged|' prefix); choose a plain name such as 'multihead'"
        )
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {sorted(KERNELS)}, got {kernel!r}")
    attention_interface, mask_interface = _transformers()
    attention_interface.register(name, _forward_for(kernel))
    mask_interface.register(name, structured_mask)
    return name
