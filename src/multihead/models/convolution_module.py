"""Conformer's convolution module (Gulati et al., 2020), as a pre-norm residual block.

    x + Dropout(Linear(SiLU(LayerNorm(DepthwiseConv(GLU(Linear(LayerNorm(x))))))))

Self-attention compares every frame with every other; the depthwise convolution looks at a
fixed neighbourhood, which is where the cues that tell one phone from another live (a
consonant's burst and its formant transitions). A LayerNorm stands in for the paper's
BatchNorm: batch statistics over padded, ragged utterances would depend on the padding.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvolutionModule"]


class ConvolutionModule(nn.Module):
    """A residual block: pointwise conv + GLU, depthwise conv over time, pointwise conv.

    Padded frames are zeroed before the depthwise convolution, so a real frame near the end
    of a short utterance sees silence beyond it, whatever the batch's padding holds.
    """

    def __init__(self, d_model: int, kernel_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(
            d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model
        )
        self.depthwise_norm = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """x (batch, frames, d_model), real (batch, frames) bool: True where a frame is real."""
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        h = h.masked_fill(~real.unsqueeze(-1), 0.0)
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        h = self.pointwise_out(F.silu(self.depthwise_norm(h)))
        return x + self.dropout(h)
