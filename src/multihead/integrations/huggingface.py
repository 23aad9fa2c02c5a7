"""`multihead.attention` as a Hugging Face transformers attention implementation.

    from multihead.integrations import huggingface
    huggingface.register()  # once: then any model can take attn_implementation="multihead"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multihead")

transformers calls the registered function from inside each attention layer with its
projected heads, (batch, heads, seq, head_dim) as here, and the 4-D mask its mask function
built for the whole model. The mask function registered beside it is transformers' own
`sdpa_mask`: a boolean mask with our polarity (True = may attend), or None when a plain
causal mask (or no mask) is enough, so that mask reaches `attention` unchanged and a plain
causal one takes the kernels' causal fast path. Grouped-query keys and values go in with
their own head count (no copies).

This module is plain torch: transformers is imported by `register` only, so `import
multihead` never pulls it in.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import KernelArg, attention
from ..kernels import KERNELS

__all__ = ["attention_forward", "register"]

INSTALL_HINT = "pip install multihead[hf]"
# transformers treats "org/repo" names as hub kernels and "paged|x" as paged attention, and
# "eager" is its own fallback: none of them can name this implementation.
_RESERVED = ("eager",)


def attention_forward(
    module: nn.Module | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
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
        attention_mask: None, a bool mask (True = may attend) or an additive float mask,
            (batch|1, heads|1, q_len, k_len).
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


def _with_bias(mask: Tensor | None, bias: Tensor) -> Tensor:
    """One additive mask from a position bias and a bool (True = may attend) or float mask."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, -torch.inf)
    return bias + mask.to(bias.dtype)


@functools.cache
def _forward_for(kernel: str) -> functools.partial[tuple[Tensor, Tensor | None]]:
    """One function object per kernel, so registering again changes nothing."""
    return functools.partial(attention_forward, kernel=kernel)


def _transformers() -> tuple[Any, Any, Any]:
    """AttentionInterface, AttentionMaskInterface and sdpa_mask, or a clear ImportError."""
    try:
        import transformers
        from transformers.masking_utils import sdpa_mask
    except ImportError as error:
        raise ImportError(
            "multihead.integrations.huggingface needs transformers, which is not installed: "
            f"{INSTALL_HINT}"
        ) from error
    return transformers.AttentionInterface, transformers.AttentionMaskInterface, sdpa_mask


def register(name: str = "multihead", kernel: KernelArg = "auto") -> str:
    """Make ``attn_implementation=name`` run `multihead.attention` with ``kernel``.

    Registers the attention function and, under the same name, transformers' boolean
    ``sdpa_mask`` (without a mask function of its own a custom implementation gets no
    padding mask at all). Global for the process, like transformers' registry; calling it
    again with the same arguments changes nothing, and with another kernel replaces it.
    Returns ``name``, to pass on as ``attn_implementation``.
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
    attention_interface, mask_interface, sdpa_mask = _transformers()
    attention_interface.register(name, _forward_for(kernel))
    mask_interface.register(name, sdpa_mask)
    return name
