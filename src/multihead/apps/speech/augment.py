"""Augmentations that make five speakers sound like more.

Speed perturbation (resampling: tempo and pitch together, as Kaldi's), vocal tract length
perturbation (warped mel filters; see `features.vtlp_warp`), gain and noise, and SpecAugment
masks. Cross-speaker generalisation is what these are for: the training set has five voices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

__all__ = ["AugmentConfig", "add_noise", "resample", "spec_augment", "speed_perturb"]


@dataclass(frozen=True)
class AugmentConfig:
    """What the training batches get. A range (lo, hi) is sampled uniformly per utterance."""

    speed: tuple[float, float] | None = (0.85, 1.15)
    vtlp: tuple[float, float] | None = (0.85, 1.15)
    spec_augment: bool = True
    freq_masks: int = 2
    freq_width: int = 8
    time_masks: int = 2
    time_width: int = 8
    time_ratio: float = 0.15  # at most this fraction of an utterance's frames is masked in all
    # Each augmentation hits an utterance with this probability; training ramps it up from 0
    # (clean data first: CTC leaves its all-blank plateau sooner, then learns invariances).
    prob: float = 1.0
    # Speed perturbation's own probability (None: ``prob``). Tempo is the invariance the model
    # learns slowest, so it may be worth applying to every utterance.
    speed_prob: float | None = None

    def __post_init__(self) -> None:
        for name in ("prob", "speed_prob"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("speed", "vtlp"):
            span = getattr(self, name)
            if span is not None and not 0 < span[0] <= span[1]:
                raise ValueError(f"{name} must be None or (lo, hi) with 0 < lo <= hi, got {span}")

    def scaled(self, share: float) -> AugmentConfig:
        """This config with every probability multiplied by ``share`` (the training ramp)."""
        speed_prob = None if self.speed_prob is None else self.speed_prob * share
        return replace(self, prob=self.prob * share, speed_prob=speed_prob)

    @property
    def speed_chance(self) -> float:
        """The probability that an utterance's speed is perturbed."""
        return self.prob if self.speed_prob is None else self.speed_prob


def _fast_len(n: int) -> int:
    """The smallest 7-smooth number >= n: FFTs of such lengths are fast, of primes slow."""
    n = max(n, 1)
    while True:
        rest = n
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return n
        n += 1


def _fft_resample(wave: np.ndarray, m: int) -> np.ndarray:
    """Band-limited change of length to ``m`` samples: keep (or zero-pad) the low bins."""
    n = len(wave)
    spectrum = np.fft.rfft(wave)
    keep = min(len(spectrum), m // 2 + 1)
    return np.fft.irfft(spectrum[:keep], n=m) * (m / n)


def resample(wave: np.ndarray, orig_rate: float, new_rate: float) -> np.ndarray:
    """Band-limited resampling through the FFT.

    Exact for periodic signals; the clips start and end near silence, so the wrap-around is
    negligible, and zero-padding to a fast FFT length keeps it as cheap as a polyphase filter.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    n = len(wave)
    m = max(1, round(n * new_rate / orig_rate))
    if m == n or n == 0:
        return wave.astype(np.float32, copy=True)
    padded = np.pad(wave, (0, _fast_len(n) - n))
    out = _fft_resample(padded, round(len(padded) * new_rate / orig_rate))
    return out[:m].astype(np.float32)


def speed_perturb(wave: np.ndarray, factor: float) -> np.ndarray:
    """Play about ``factor`` times faster (and higher): resample, keep the sample rate.

    Both FFT lengths are rounded to fast sizes, which moves the factor by a fraction of a percent.
    """
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    n = len(wave)
    # Among a few fast padded lengths, take the one whose fast output length fits the factor.
    candidates = [_fast_len(n)]
    for _ in range(3):
        candidates.append(_fast_len(candidates[-1] + 1))
    pairs = [(c, _fast_len(max(1, round(c / factor)))) for c in candidates]
    n_fast, m_fast = min(pairs, key=lambda nm: abs(nm[0] / nm[1] - factor))
    out = _fft_resample(np.pad(wave, (0, n_fast - n)), m_fast)
    return out[: max(1, round(n * m_fast / n_fast))].astype(np.float32)


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white or pink-ish noise at ``snr_db`` below the speech power.

    The noise also fills the digital silence between joined clips, which would otherwise give
    a cue (log of zero) that real recordings never have.
    """
    white = rng.standard_normal(len(wave)).astype(np.float32)
    if rng.random() < 0.5:  # pink-ish: a leaky integrator tilts the spectrum down
        white = np.asarray(np.cumsum(white) * 0.02, dtype=np.float32)
        white -= np.convolve(white, np.ones(64, dtype=np.float32) / 64, mode="same")
    speech_power = float(np.mean(wave**2)) + 1e-10
    noise_power = float(np.mean(white**2)) + 1e-10
    scale = np.sqrt(speech_power / noise_power / 10 ** (snr_db / 10))
    return (wave + scale * white).astype(np.float32)


def colored_noise(n: int, rng: np.random.Generator, tilt: float) -> np.ndarray:
    """Gaussian noise of unit power whose spectrum falls (tilt < 0) or rises as f^tilt.

    Room noise, hum and hiss differ by microphone; a random tilt covers more of them than
    white and pink noise alone.
    """
    size = _fast_len(max(n, 2))
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.arange(len(spectrum), dtype=np.float64)
    spectrum *= np.maximum(freqs, 1.0) ** (tilt / 2)
    noise = np.fft.irfft(spectrum, n=size)[:n]
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def spec_augment(
    feats: Tensor,
    frames: Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    select: Sequence[bool] | None = None,
) -> Tensor:
    """SpecAugment (Park et al., 2019): zero random mel bands and random stretches of time.

    ``feats`` (batch, time, mels) are normalised, so zero is the mean. Time masks are capped
    by ``time_ratio`` of each utterance so a short one-digit utterance keeps its digit.
    ``select`` says which utterances of the batch get masks (default: all).
    """
    feats = feats.clone()
    batch, _, n_mels = feats.shape

    def draw(high: int) -> int:
        return int(torch.randint(0, max(high, 0) + 1, (1,), generator=generator))

    for b in range(batch):
        if select is not None and not select[b]:
            continue
        for _ in range(config.freq_masks):
            width = draw(min(config.freq_width, n_mels - 1))
            start = draw(n_mels - width)
            feats[b, :, start : start + width] = 0.0
        length = int(frames[b])
        budget = int(config.time_ratio * length)
        for _ in range(config.time_masks):
            width = draw(min(config.time_width, budget // max(config.time_masks, 1)))
            start = draw(length - width)
            feats[b, start : start + width, :] = 0.0
    return feats
