"""Vision Transformer (Dosovitskiy et al., 2021): an image is a sequence of patches.

    image (batch, channels, H, W)
    → patch embedding: Conv2d with stride P, one d_model vector per P×P patch
    → flatten the (H/P)×(W/P) grid into a sequence, prepend the learned [class] token
    → + learned position embeddings → dropout
    → multihead.transformer.Encoder (pre-norm, with its final norm)
    → the [class] token's output → Linear head → class logits

``patch_kernel`` > ``patch_size`` lets neighbouring patches overlap (overlapping patch
embedding, as in PVT v2): the convolution sees a border around each patch but still makes one
token per patch. On tiny images the extra locality is worth more than the paper's purity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..attention_config import AttentionConfig, model_attention
from ..positional import LearnedPositions
from ..transformer import Encoder
from .base import PretrainedMixin, check_input

__all__ = ["ViT", "ViTConfig"]


@dataclass
class ViTConfig:
    """Sizes of a ViT. The defaults fit scikit-learn's 8×8 digits: 16 patches of 2×2 (the
    digits app also sets ``patch_kernel=3`` so neighbouring patches overlap)."""

    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    patch_kernel: int | None = None  # None: = patch_size, the paper's non-overlapping patches
    num_classes: int = 10
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 4
    dim_feedforward: int = 128
    dropout: float = 0.0
    activation: Literal["relu", "gelu"] = "gelu"
    # Options of every attention layer (GQA, QK-norm, softcap, RoPE/ALiBi/relative positions);
    # None, as in configs saved before it existed, is plain attention.
    attention: AttentionConfig | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "num_classes", "d_model",
                     "num_heads", "num_layers", "dim_feedforward"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size "
                f"({self.patch_size}): every pixel belongs to exactly one patch"
            )
        kernel = self.patch_kernel
        if kernel is not None and (
            isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < self.patch_size
        ):
            raise ValueError(f"patch_kernel must be an int >= patch_size or None, got {kernel!r}")
        if self.patch_size == 1 and self.kernel % 2 == 0:
            raise ValueError(
                f"patch_kernel must be odd when patch_size is 1, got {kernel}: "
                "an even kernel cannot be centred on a pixel"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        self.attention = model_attention(self.attention, self.num_heads)

    @property
    def kernel(self) -> int:
        """Side of the patch embedding's convolution kernel."""
        return self.patch_size if self.patch_kernel is None else self.patch_kernel

    @property
    def num_patches(self) -> int:
        """Patches per image: (image_size // patch_size)²."""
        return (self.image_size // self.patch_size) ** 2


class ViT(PretrainedMixin, nn.Module):
    """Image classification with a Transformer encoder over patches and a [class] token."""

    config_class = ViTConfig

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = c = config
        # A P×P convolution with stride P is a linear map of each flattened patch (the paper's
        # E); a larger kernel, padded to keep the grid, overlaps neighbouring patches.
        self.patch_embedding = nn.Conv2d(
            c.in_channels,
            c.d_model,
            kernel_size=c.kernel,
            stride=c.patch_size,
            padding=(c.kernel - c.patch_size + 1) // 2,
        )
        self.class_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.positions = LearnedPositions(c.d_model, c.num_patches + 1)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = Encoder(
            c.num_layers,
            c.d_model,
            c.num_heads,
            c.dim_feedforward,
            c.dropout,
            attention=c.attention,
            activation=c.activation,
        )
        self.head = nn.Linear(c.d_model, c.num_classes)

    def _check(self, images: object) -> Tensor:
        c = self.config
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )
        return check_input("images", images, self.patch_embedding.weight)

    def patches(self, images: Tensor) -> Tensor:
        """(batch, channels, H, W) → patch embeddings (batch, num_patches, d_model), row-major."""
        return self.patch_embedding(self._check(images)).flatten(2).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        """images (batch, in_channels, image_size, image_size) → logits (batch, num_classes)."""
        x = self.patches(images)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.dropout(self.positions(x))
        x = self.encoder(x)  # ends with the final norm (pre-norm stack)
        return self.head(x[:, 0])
