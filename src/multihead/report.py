"""`explain_module`: which kernel each attention layer of a model runs, and how much work.

`multihead.explain` answers for one call on raw (query, key, value). A model makes many,
with masks and caches built inside it; this runs the model once and reports, per attention
layer in call order, the kernel that ran, why, and the share of the q_len × k_len scores it
computed (block skipping and causal fast paths compute less).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import functional
from .kernels import Kernel, Request, sdpa, tiled
from .multi_head_attention import MultiHeadAttention

__all__ = ["LayerReport", "ModelReport", "explain_call", "explain_module"]


@dataclass(frozen=True)
class LayerReport:
    """One attention call: the layer's name in the model, its shapes and kernel."""

    layer: str
    shape: tuple[int, int, int, int]  # (batch, heads, q_len, k_len)
    kernel: str
    fraction: float  # share of the q_len × k_len scores computed
    explanation: str


class ModelReport(list[LayerReport]):
    """The layers' reports, printable as a table."""

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'batch×heads×q×k':<20} {'kernel':<10} {'work':>6}"]
        for row in self:
            shape = "×".join(str(n) for n in row.shape)
            lines.append(f"{row.layer:<32} {shape:<20} {row.kernel:<10} {row.fraction:>6.0%}")
        return "\n".join(lines)


def _fraction(request: Request, chosen: Kernel) -> float:
    if chosen is tiled:
        return tiled.plan_for(request).fraction
    if chosen is sdpa and request.is_causal and request.q_len:
        # torch's fused kernels skip the blocks above the diagonal
        q, k = request.q_len, request.k_len
        return min(1.0, (q + 1) / (2 * k)) if q == k else 1.0
    return 1.0


def explain_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask: object = None,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    kernel: str = "auto",
) -> LayerReport:
    """What `multihead.attention` would do with these arguments, without running it: the
    kernel, why, and the share of the scores it computes. Only shapes, dtypes and devices
    are read, so zero-stride tensors (``torch.zeros(()).expand(...)``) of any size will do."""
    request = functional._request(
        query=query, key=key, value=value, mask=mask, causal=causal, scale=None,
        dropout_p=dropout_p, softcap=None, return_weights=return_weights,
    )  # fmt: skip
    chosen = functional.select_kernel(request, kernel)
    batch, heads = request.query.shape[:2]
    return LayerReport(
        layer="(call)",
        shape=(batch, heads, request.q_len, request.k_len),
        kernel=chosen.NAME,
        fraction=_fraction(request, chosen),
        explanation=functional.explain_request(request, chosen, kernel),
    )


def explain_module(module: nn.Module, *args: object, **kwargs: object) -> ModelReport:
    """Run ``module(*args, **kwargs)`` once (no gradients) and report every attention call
    made inside it: layer name, shape, kernel, work fraction and `multihead.explain`'s line."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    names = {layer: name or "(model)" for name, layer in module.named_modules()}
    current: list[str] = []
    report = ModelReport()

    def enter(layer: nn.Module, _: object) -> None:
        current.append(names.get(layer, type(layer).__name__))

    def leave(layer: nn.Module, _: object, __: object) -> None:
        current.pop()

    def observe(request: Request, chosen: Kernel, kernel: str) -> None:
        batch, heads = request.query.shape[:2]
        report.append(
            LayerReport(
                layer=current[-1] if current else "(outside a layer)",
                shape=(batch, heads, request.q_len, request.k_len),
                kernel=chosen.NAME,
                fraction=_fraction(request, chosen),
                explanation=functional.explain_request(request, chosen, kernel),
            )
        )

    hooks = []
    for layer in module.modules():
        if isinstance(layer, MultiHeadAttention):
            hooks.append(layer.register_forward_pre_hook(enter))
            hooks.append(layer.register_forward_hook(leave))
    functional.OBSERVERS.append(observe)
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        functional.OBSERVERS.remove(observe)
        for hook in hooks:
            hook.remove()
    return report
