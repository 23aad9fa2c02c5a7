"""Speech encoder for CTC: log-mel → conv subsampling ×4 → Transformer encoder → tokens.

    log-mel (batch, frames, n_mels)
    → Conv2d 3×3 stride 2 → act → Conv2d 3×3 stride 2 → act   (frames / 4, mels / 4)
    → Linear to d_model → + sinusoidal positions (unless the attention brings its own) → dropout
    → multihead.transformer.Encoder (key padding mask: True = a real frame), optionally
      with a Conformer convolution module after each layer (``conv_kernel``)
    → Linear to vocab_size → log_softmax                       (CTC over blank + labels)

The convolutions cut the sequence four-fold before attention (10 ms frames become 40 ms),
which is what makes self-attention affordable on a CPU, and learn local spectral patterns
that a per-frame linear layer would not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention_config import AttentionConfig, model_attention
from ..masks import padding
from ..positional import SinusoidalPositions
from ..transformer import Encoder
from .base import PretrainedMixin, check_input
from .convolution_module import ConvolutionModule

__all__ = ["SpeechEncoder", "SpeechEncoderConfig", "ctc_loss"]


@dataclass
class SpeechEncoderConfig:
    """Architecture, plus the front end the weights were trained with (for transcription)."""

    n_mels: int = 40
    vocab_size: int = 11  # CTC blank (0) + the digits 0-9
    d_model: int = 144
    num_heads: int = 4
    num_layers: int = 4
    dim_feedforward: int = 576
    dropout: float = 0.1
    conv_channels: int = 64
    activation: str = "gelu"
    max_len: int = 1024  # positions after subsampling: 1024 × 40 ms ≈ 41 s
    # Front end (see multihead.apps.speech.features.FeatureConfig); not used by forward.
    sample_rate: int = 8000
    n_fft: int = 256
    win_length: int = 200
    hop_length: int = 80
    f_min: float = 20.0
    mel_scale: str = "htk"
    # Options of every attention layer (GQA, QK-norm, softcap, RoPE/ALiBi/relative positions);
    # None, as in configs saved before it existed, is plain attention.
    attention: AttentionConfig | None = None
    # Add sinusoidal absolute positions to the input. With relative positions in the attention
    # (RoPE, T5 buckets, ALiBi) they may be left out: a word then looks the same wherever it
    # starts, and only distances between frames count. Saved configs without it had them.
    absolute_positions: bool = True
    # A Conformer convolution module of this kernel (frames of 40 ms) after every encoder
    # layer's feed-forward; 0, as in configs saved before it existed, is none.
    conv_kernel: int = 0

    def __post_init__(self) -> None:
        for name in ("n_mels", "vocab_size", "d_model", "num_heads", "num_layers",
                     "dim_feedforward", "conv_channels", "max_len"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_mels < 7:
            raise ValueError(
                f"n_mels must be >= 7 for two stride-2 convolutions, got {self.n_mels}"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise TypeError(f"dropout must be a number, got {type(self.dropout).__name__}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        kernel = self.conv_kernel
        if (
            isinstance(kernel, bool)
            or not isinstance(kernel, int)
            or kernel < 0
            or (kernel and kernel % 2 == 0)
        ):
            raise ValueError(f"conv_kernel must be 0 or a positive odd int, got {kernel!r}")
        if not isinstance(self.absolute_positions, bool):
            raise TypeError(f"absolute_positions must be a bool, got {self.absolute_positions!r}")
        self.attention = model_attention(self.attention, self.num_heads)


def subsampled_length(lengths: Tensor) -> Tensor:
    """Frames left after two 3×3 stride-2 convolutions without padding."""
    return ((lengths - 3) // 2 + 1 - 3) // 2 + 1


def ctc_loss(
    log_probs: Tensor, out_lengths: Tensor, targets: Tensor, target_lengths: Tensor
) -> Tensor:
    """Mean CTC loss per target token of a `SpeechEncoder`'s output (blank is id 0). Apart
    from the model so that a wrapper's forward (DDP) can produce the log-probabilities."""
    return F.ctc_loss(
        log_probs.transpose(0, 1),
        targets,
        out_lengths,
        target_lengths,
        blank=0,
        reduction="mean",
        zero_infinity=True,
    )


class SpeechEncoder(PretrainedMixin, nn.Module):
    """Transformer encoder with a CTC head. ``forward`` returns log-probabilities per frame."""

    config_class = SpeechEncoderConfig

    def __init__(self, config: SpeechEncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, SpeechEncoderConfig):
            raise TypeError(f"config must be a SpeechEncoderConfig, got {type(config).__name__}")
        self.config = c = config
        act = nn.GELU() if c.activation == "gelu" else nn.ReLU()
        self.subsample = nn.Sequential(
            nn.Conv2d(1, c.conv_channels, 3, stride=2),
            act,
            nn.Conv2d(c.conv_channels, c.conv_channels, 3, stride=2),
            act,
        )
        reduced_mels = int(subsampled_length(torch.tensor(c.n_mels, device="cpu")))
        self.input_proj = nn.Linear(c.conv_channels * reduced_mels, c.d_model)
        self.positions = SinusoidalPositions(c.d_model, c.max_len)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = Encoder(
            c.num_layers,
            c.d_model,
            c.num_heads,
            c.dim_feedforward,
            c.dropout,
            attention=c.attention,
            activation=c.activation,  # type: ignore[arg-type]
        )
        self.convolutions = nn.ModuleList(
            ConvolutionModule(c.d_model, c.conv_kernel, c.dropout)
            for _ in range(c.num_layers if c.conv_kernel else 0)
        )
        self.head = nn.Linear(c.d_model, c.vocab_size)

    def _encode(self, x: Tensor, out_lengths: Tensor) -> Tensor:
        """The encoder stack, with a convolution module after each layer when configured."""
        mask = padding(out_lengths.to(x.device), x.shape[1])
        if not self.convolutions:
            return self.encoder(x, mask=mask)
        real = torch.arange(x.shape[1], device=x.device) < out_lengths.to(x.device)[:, None]
        for layer, convolution in zip(self.encoder.layers, self.convolutions, strict=True):
            x = convolution(layer(x, mask=mask), real)
        return x if self.encoder.norm is None else self.encoder.norm(x)

    def _check(self, feats: object, lengths: object) -> tuple[Tensor, Tensor]:
        if not isinstance(feats, Tensor):
            raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}")
        if feats.ndim != 3 or feats.shape[-1] != self.config.n_mels:
            raise ValueError(
                f"feats must be (batch, frames, {self.config.n_mels}), got {tuple(feats.shape)}"
            )
        check_input("feats", feats, self.head.weight)
        if lengths is None:
            lengths = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long)
        if not isinstance(lengths, Tensor) or lengths.shape != (feats.shape[0],):
            raise ValueError(f"lengths must be a ({feats.shape[0]},) tensor of frame counts")
        if torch.compiler.is_compiling():  # the range check is a host read
            return feats, lengths.to(torch.long)
        if int(lengths.min()) < 7 or int(lengths.max()) > feats.shape[1]:
            raise ValueError(
                f"lengths must be in [7, {feats.shape[1]}] frames, got {lengths.tolist()}"
            )
        return feats, lengths.to(torch.long)

    def forward(self, feats: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """feats (batch, frames, n_mels), lengths (batch,) → log-probs (batch, frames / 4,
        vocab_size) and the output lengths (batch,)."""
        feats, lengths = self._check(feats, lengths)
        x = self.subsample(feats.unsqueeze(1))  # (batch, channels, frames/4, mels/4)
        x = self.input_proj(x.transpose(1, 2).flatten(2))  # (batch, frames/4, d_model)
        out_lengths = subsampled_length(lengths).clamp(max=x.shape[1])
        if self.config.absolute_positions:
            x = self.positions(x)
        x = self.dropout(x)
        x = self._encode(x, out_lengths)
        return F.log_softmax(self.head(x), dim=-1), out_lengths

    def ctc_loss(
        self, feats: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor
    ) -> Tensor:
        """Mean CTC loss per target token; ``targets`` are concatenated label ids (no blanks)."""
        return ctc_loss(*self(feats, lengths), targets, target_lengths)
