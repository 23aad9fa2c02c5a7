"""Record every `MultiHeadAttention`'s per-head weights during a forward pass, in one call.

    with capture_attention(model) as captured:
        model(src, tgt)
    captured["decoder.layers.0.cross_attn"]  # (batch, heads, q_len, k_len)

The model's code is not changed and nothing is hooked: the layer consults a module-level list
(`multihead.multi_head_attention.weights_recorders`), which holds it only inside the ``with``
block. A capture does not change the model's outputs: each layer runs the kernel it runs
without one, and computes the weights beside it (the float reference kernel, without
autograd), so inside the block every layer costs one extra weights pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..multi_head_attention import MultiHeadAttention, weights_recorders

__all__ = ["CapturedAttention", "capture_attention"]


class CapturedAttention(Mapping[str, Tensor]):
    """Weights per module name (as in ``model.named_modules()``), in the order layers ran.

    ``captured[name]`` is (batch, heads, q_len, k_len). A module called several times in the
    block (step-by-step decoding with a KV cache: one query per call) has its calls joined
    along the query axis, keys padded with zeros to the longest call: for cached causal
    decoding that is exactly the lower-triangular matrix of a single full pass. The raw calls
    stay in ``calls[name]``.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[Tensor]] = {}

    def __getitem__(self, name: str) -> Tensor:
        calls = self.calls[name]
        if len(calls) == 1:
            return calls[0]
        shapes = {tuple(w.shape[:2]) for w in calls}
        if len(shapes) != 1:
            raise ValueError(
                f"{name} ran {len(calls)} times with different (batch, heads) {sorted(shapes)}; "
                f"read captured.calls[{name!r}] instead"
            )
        k_len = max(w.shape[-1] for w in calls)
        padded = [torch.nn.functional.pad(w, (0, k_len - w.shape[-1])) for w in calls]
        return torch.cat(padded, dim=2)

    def __iter__(self) -> Iterator[str]:
        return iter(self.calls)

    def __len__(self) -> int:
        return len(self.calls)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {tuple(self[name].shape)}" for name in self)
        return f"CapturedAttention({shapes})"


@contextmanager
def capture_attention(
    model: nn.Module, *, device: torch.device | str | None = "cpu"
) -> Iterator[CapturedAttention]:
    """Record the per-head weights of every MultiHeadAttention inside ``model`` in the block.

    Weights are detached and moved to ``device`` (None: left where they are). Layers of other
    models that run in the block are not recorded. A `SlidingWindowKVCache` step of one
    token with no mask, position bias or weights asked for attends over its ring buffer in
    slot order, and its weights are recorded in that order. The switch is a context variable, so a
    capture in one thread does not slow down another.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = {
        id(module): name
        for name, module in model.named_modules()
        if isinstance(module, MultiHeadAttention)
    }
    if not names:
        raise ValueError(f"{type(model).__name__} has no MultiHeadAttention layer to record")
    captured = CapturedAttention()

    def record(module: MultiHeadAttention, weights: Tensor) -> None:
        name = names.get(id(module))
        if name is not None:
            weights = weights.detach()
            captured.calls.setdefault(name, []).append(
                weights if device is None else weights.to(device)
            )

    weights_recorders.append(record)
    try:
        yield captured
    finally:
        weights_recorders.remove(record)
