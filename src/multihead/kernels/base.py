"""What every kernel receives: one validated attention request."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..masks import Mask


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

    @cached_property
    def mask(self) -> Tensor | None:
        """The whole mask as one dense tensor (bool, or float when a bias was given).

        None when there is no mask, or when ``is_causal`` (the fast path needs no tensor).
        """
        if self.is_causal or self.structured is None:
            return self.bias
        dense = self.structured.to_dense(self.query.device)
        if self.bias is None:
            return dense
        if self.bias.dtype == torch.bool:
            return self.bias & dense
        return self.bias.masked_fill(~dense, -torch.inf)
