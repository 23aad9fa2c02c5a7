"""Position information for attention, which by itself is blind to order.

Both classes add a position vector to each token vector (batch, seq, d_model). ``offset``
is the position of the first token: when decoding with a KV cache only the newest token is
fed, and it must get its true position, not position 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LearnedPositions", "SinusoidalPositions"]


def _check_span(x: Tensor, offset: int, max_len: int, d_model: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D (batch, seq, d_model), got shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"x has {x.shape[-1]} features but the positions have d_model={d_model}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if offset + x.shape[1] > max_len:
        raise ValueError(
            f"positions {offset}..{offset + x.shape[1] - 1} are needed but max_len is {max_len}: "
            "shorten the sequence or build the model with a larger max_len"
        )


def sinusoid_table(max_len: int, d_model: int) -> Tensor:
    """The paper's table: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]
    return table.float()


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al., 2017, §3.5): no parameters to learn.

    The table is a non-persistent buffer: it is rebuilt from (max_len, d_model), so it never
    lands in a checkpoint.
    """

    pe: Tensor

    def __init__(self, d_model: int, max_len: int = 512) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_model, self.max_len = d_model, max_len
        self.register_buffer("pe", sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x + PE[offset : offset + seq]."""
        _check_span(x, offset, self.max_len, self.d_model)
        return x + self.pe[offset : offset + x.shape[1]].to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositions(nn.Module):
    """One learned vector per position (BERT, GPT-2): positions past max_len do not exist."""

    def __init__(self, d_model: int, max_len: int = 512, init_std: float = 0.02) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_model, self.max_len = d_model, max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x + P[offset : offset + seq]."""
        _check_span(x, offset, self.max_len, self.d_model)
        return x + self.embedding.weight[offset : offset + x.shape[1]].to(x.dtype)
