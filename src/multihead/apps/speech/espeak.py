"""Synthetic speakers from ``espeak-ng``: many more voices than FSDD's five training speakers.

A synthetic speaker is an espeak-ng accent (en-us, en-gb-scotland, ...) with a voice variant,
a pitch and a speaking rate; it says each digit word twice at slightly different rates. The
audio is made offline by the locally installed program (nothing is downloaded), resampled to
8 kHz and optionally cached as .npz under a gitignored directory.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .augment import resample
from .data import SAMPLE_RATE, Clip

S = TypeVar("S")

__all__ = [
    "ACCENTS",
    "DIGIT_WORDS",
    "VARIANTS",
    "EspeakUnavailable",
    "SynthesiserUnavailable",
    "SyntheticSpeaker",
    "available",
    "cached_clips",
    "digit_clips",
    "speak",
    "synthetic_clips",
    "synthetic_speakers",
    "trim",
    "wave_of",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = (
    "en-us",
    "en-us-nyc",
    "en-gb",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
)
# Mostly male variants, as every FSDD speaker is male; a few others for spread.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "klatt", "klatt2", "klatt3", "adam", "david", "edward", "john", "max",
    "michael", "paul", "robert", "travis", "victor", "f1", "f2", "f4",
)  # fmt: skip


class SynthesiserUnavailable(RuntimeError):
    """A speech synthesiser is not installed; the synthetic speakers are optional."""


class EspeakUnavailable(SynthesiserUnavailable):
    """espeak-ng is not installed."""


def _missing() -> EspeakUnavailable:
    return EspeakUnavailable(
        "espeak-ng is not installed (Debian: apt-get install -y espeak-ng); "
        "train without --espeak or install it"
    )


@dataclass(frozen=True)
class SyntheticSpeaker:
    accent: str
    variant: str
    pitch: int  # espeak-ng -p, 0-99 (50 is the default)
    rate: int  # espeak-ng -s, words per minute

    @property
    def name(self) -> str:
        return f"espeak:{self.accent}+{self.variant}:p{self.pitch}:s{self.rate}"


def available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthetic_speakers(count: int, seed: int = 0) -> list[SyntheticSpeaker]:
    """``count`` distinct speakers: accents in turn, random variant, pitch and rate."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = np.random.default_rng(seed)
    speakers: list[SyntheticSpeaker] = []
    while len(speakers) < count:
        speaker = SyntheticSpeaker(
            ACCENTS[len(speakers) % len(ACCENTS)],
            VARIANTS[int(rng.integers(len(VARIANTS)))],
            int(rng.integers(20, 80)),
            int(rng.integers(130, 220)),
        )
        if speaker not in speakers:
            speakers.append(speaker)
    return speakers


def trim(wave: np.ndarray, threshold: float = 0.02, margin: int = 160) -> np.ndarray:
    """Cut a synthesiser's leading and trailing silence, as FSDD's recordings are trimmed."""
    loud = np.flatnonzero(np.abs(wave) > threshold * (np.abs(wave).max() + 1e-8))
    if loud.size == 0:
        return wave
    return wave[max(0, loud[0] - margin) : loud[-1] + margin]


def speak(text: str, accent: str, variant: str, pitch: int, rate: int) -> np.ndarray:
    """``text`` spoken by espeak-ng, as float32 samples at 8 kHz."""
    if not available():
        raise _missing()
    command = ["espeak-ng", "-v", f"{accent}+{variant}", "-p", str(pitch), "-s", str(rate)]
    result = subprocess.run([*command, "--stdout", text], capture_output=True, check=True)
    return wave_of(result.stdout)


def wave_of(wav: bytes) -> np.ndarray:
    """A synthesiser's WAV output as float32 samples at 8 kHz, silence trimmed."""
    import soundfile

    wave, rate_hz = soundfile.read(io.BytesIO(wav), dtype="float32")
    return trim(resample(wave, rate_hz, SAMPLE_RATE))


def digit_clips(name: str, say: Callable[[str, float], np.ndarray]) -> list[Clip]:
    """One synthetic speaker's clips: every digit word at two tempos, a take each;
    ``say(word, factor)`` speaks at ``factor`` times the speaker's own duration."""
    clips = []
    for take, factor in enumerate((0.9, 1.1)):
        for digit, word in enumerate(DIGIT_WORDS):
            clips.append(Clip(digit, name, take, say(word, factor)))
    return clips


def _clips_of(speaker: SyntheticSpeaker) -> list[Clip]:
    def say(word: str, factor: float) -> np.ndarray:
        rate = round(speaker.rate * factor)
        return speak(word, speaker.accent, speaker.variant, speaker.pitch, rate)

    return digit_clips(speaker.name, say)


def synthetic_clips(
    count: int = 40, seed: int = 0, cache_dir: Path | str | None = None, threads: int = 2
) -> list[Clip]:
    """Clips of ``count`` synthetic speakers (20 each: every digit at two rates).

    Raises `EspeakUnavailable` when espeak-ng is missing, so callers can skip with a message.
    """
    if not available():
        raise _missing()
    cache = None if cache_dir is None else Path(cache_dir) / f"espeak-{count}-{seed}.npz"
    return cached_clips(cache, _clips_of, synthetic_speakers(count, seed), threads)


def cached_clips(
    cache: Path | None,
    clips_of: Callable[[S], list[Clip]],
    speakers: Sequence[S],
    threads: int = 2,
) -> list[Clip]:
    """Every speaker's clips, read from the ``cache`` .npz when it exists, else synthesised
    (``threads`` programs at a time) and written there."""
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            meta = stored["meta"]
            return [
                Clip(int(d), str(s), int(i), stored[f"w{n}"]) for n, (d, s, i) in enumerate(meta)
            ]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        clips = [clip for group in pool.map(clips_of, speakers) for clip in group]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        meta = np.array([(c.digit, c.speaker, c.index) for c in clips], dtype=object)
        waves = {f"w{n}": c.wave for n, c in enumerate(clips)}
        np.savez(cache, meta=meta.astype(str), **waves)
    return clips
