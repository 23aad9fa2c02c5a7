"""What every kernel receives: one validated attention request."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Request:
    """A validated call of `multihead.attention`, in the library's layout.

    query (batch, heads, q_len, head_dim); key (batch, kv_heads, k_len, head_dim);
    value (batch, kv_heads, k_len, value_dim). ``mask`` is None or a dense tensor
    broadcastable to (batch, heads, q_len, k_len): bool True = may attend, or a float
    additive bias. ``is_causal`` is set only for a plain top-left causal mask and then
    ``mask`` is None, so kernels with a causal fast path can take it.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    is_causal: bool
    scale: float
    dropout_p: float
    softcap: float | None
    return_weights: bool

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]
