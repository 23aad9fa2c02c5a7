"""Log-mel features from ``torch.stft``, with the mel filterbank written out.

The filterbank is computed here rather than taken from torchaudio so the project has no audio
dependency and so vocal-tract-length perturbation can warp the filter frequencies per utterance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = [
    "FeatureConfig",
    "hz_to_mel",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "num_frames",
    "vtlp_warp",
]

SCALES = ("htk", "slaney")


@dataclass(frozen=True)
class FeatureConfig:
    """STFT and mel settings. The defaults suit 8 kHz speech: 25 ms windows every 10 ms."""

    sample_rate: int = 8000
    n_fft: int = 256
    win_length: int = 200
    hop_length: int = 80
    n_mels: int = 40
    f_min: float = 20.0
    f_max: float | None = None  # None: the Nyquist frequency
    scale: str = "htk"

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must be <= n_fft ({self.n_fft})")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if not 0 <= self.f_min < self.top:
            raise ValueError(f"f_min must be in [0, f_max={self.top}), got {self.f_min}")
        if self.top > self.sample_rate / 2:
            raise ValueError(f"f_max must be <= sample_rate / 2, got {self.f_max}")

    @property
    def top(self) -> float:
        return self.sample_rate / 2 if self.f_max is None else float(self.f_max)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# -- the mel scale --------------------------------------------------------------------------------
# HTK: mel = 2595 log10(1 + f / 700). Slaney (Auditory Toolbox): linear below 1 kHz at
# 200/3 Hz per mel, logarithmic above with 27 mels per factor 6.4.
_SLANEY_STEP = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_STEP  # 15
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: Tensor, scale: str = "htk") -> Tensor:
    """Frequency in Hz → mel."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    if scale == "slaney":
        linear = hz / _SLANEY_STEP
        log = (
            _SLANEY_BREAK_MEL + torch.log(hz.clamp(min=1e-10) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
        )
        return torch.where(hz >= _SLANEY_BREAK_HZ, log, linear)
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def mel_to_hz(mel: Tensor, scale: str = "htk") -> Tensor:
    """Mel → frequency in Hz (the inverse of `hz_to_mel`)."""
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if scale == "slaney":
        linear = mel * _SLANEY_STEP
        log = _SLANEY_BREAK_HZ * torch.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
        return torch.where(mel >= _SLANEY_BREAK_MEL, log, linear)
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def vtlp_warp(hz: Tensor, alpha: float, nyquist: float, boundary: float = 0.8) -> Tensor:
    """Vocal tract length perturbation (Jaitly & Hinton, 2013): scale frequencies by ``alpha``.

    Piecewise linear so that 0 and the Nyquist frequency stay fixed: frequencies below the
    knee are multiplied by alpha, the rest are mapped linearly onto what is left.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    knee = boundary * nyquist * min(alpha, 1.0) / alpha
    top = nyquist - (nyquist - knee * alpha) * (nyquist - hz) / (nyquist - knee)
    return torch.where(hz <= knee, hz * alpha, top)


def mel_filterbank(
    n_freqs: int,
    sample_rate: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    scale: str = "htk",
    warp: float = 1.0,
) -> Tensor:
    """Triangular filters equally spaced in mel, as an (n_mels, n_freqs) matrix.

    Each triangle rises from the centre of its left neighbour to 1 at its own centre and falls
    to 0 at the centre of its right neighbour (HTK style: peak 1, no area normalisation).
    ``warp`` != 1 moves the centres by `vtlp_warp`.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    mels = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64), scale)),
        float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64), scale)),
        n_mels + 2,
        dtype=torch.float64,
    )
    points = mel_to_hz(mels, scale)
    if warp != 1.0:
        points = vtlp_warp(points, warp, sample_rate / 2)
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    left, centre, right = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (freqs - left) / (centre - left)
    falling = (right - freqs) / (right - centre)
    return torch.minimum(rising, falling).clamp(min=0.0).to(torch.float32)


# -- features ---------------------------------------------------------------------------------
def num_frames(num_samples: Tensor, hop_length: int) -> Tensor:
    """Frames that `log_mel` gives a signal of ``num_samples`` (centred STFT)."""
    return num_samples // hop_length + 1


def log_mel(
    waves: Tensor,
    lengths: Tensor | None = None,
    config: FeatureConfig | None = None,
    warps: Tensor | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Log-mel features of a padded batch of waveforms.

    Args:
        waves: (batch, samples) float waveforms.
        lengths: (batch,) real samples per waveform; default all of them.
        warps: (batch,) VTLP factors, one filterbank per utterance; default none.
        normalize: per-utterance mean and variance normalisation of each mel bin over its real
            frames (removes the microphone's and the speaker's fixed spectral colouring).

    Returns (batch, frames, n_mels) features, zero past each utterance's end, and the frame
    counts (batch,).
    """
    config = config or FeatureConfig()
    if not isinstance(waves, Tensor):
        raise TypeError(f"waves must be a torch.Tensor, got {type(waves).__name__}")
    if waves.ndim != 2:
        raise ValueError(f"waves must be 2-D (batch, samples), got shape {tuple(waves.shape)}")
    batch, samples = waves.shape
    if lengths is None:
        lengths = torch.full((batch,), samples, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    window = torch.hann_window(config.win_length, device=waves.device)
    spec = torch.stft(
        waves.float(),
        config.n_fft,
        hop_length=config.hop_length,
        win_length=config.win_length,
        window=window,
        center=True,
        return_complex=True,
    )
    power = spec.real.square() + spec.imag.square()  # (batch, n_freqs, frames)
    n_freqs = config.n_fft // 2 + 1
    args = (n_freqs, config.sample_rate, config.n_mels, config.f_min, config.top, config.scale)
    if warps is None:
        mel = torch.einsum("mf,bft->btm", mel_filterbank(*args).to(waves.device), power)
    else:
        if tuple(warps.shape) != (batch,):
            raise ValueError(f"warps must have shape ({batch},), got {tuple(warps.shape)}")
        banks = torch.stack([mel_filterbank(*args, warp=float(w)) for w in warps])
        mel = torch.einsum("bmf,bft->btm", banks.to(waves.device), power)
    feats = torch.log(mel + 1e-8)
    frames = num_frames(lengths, config.hop_length).clamp(max=feats.shape[1])
    valid = (torch.arange(feats.shape[1], device=feats.device)[None, :] < frames[:, None])[
        ..., None
    ]
    if normalize:
        count = frames.clamp(min=1).to(feats.dtype)[:, None, None]
        mean = (feats * valid).sum(1, keepdim=True) / count
        var = ((feats - mean).square() * valid).sum(1, keepdim=True) / count
        feats = (feats - mean) / (var + 1e-5).sqrt()
    return feats * valid, frames
