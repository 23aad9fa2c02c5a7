"""Synthetic speakers from ``flite``: voices made from real people's recordings.

espeak-ng's formant synthesis gives many voices, but none sounds like a recording. flite's
built-in voices were built from recorded speakers (kal: a diphone voice; awb, rms and slt:
statistical parametric voices of a Scottish, an American and a female American speaker), so
they bring real articulation that FSDD's five training speakers lack. A synthetic speaker is
one of them with a target pitch (rms keeps its own) and a duration stretch; it says each
digit word at two tempos. The audio is made offline by the locally installed program
(Debian: ``apt-get install flite``), resampled to 8 kHz and optionally cached.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Clip
from .espeak import SynthesiserUnavailable, cached_clips, digit_clips, wave_of

__all__ = [
    "MAX_SPEAKERS",
    "VOICES",
    "FliteSpeaker",
    "FliteUnavailable",
    "available",
    "speak",
    "synthetic_clips",
    "synthetic_speakers",
]

# voice -> the range of its target pitch in Hz (None: the voice ignores the target).
VOICES: dict[str, tuple[int, int] | None] = {
    "kal16": (80, 150),
    "awb": (80, 150),
    "rms": None,
    "slt": (100, 210),
    "kal": (80, 150),
}


# rms varies only in its stretch (46 values of 0.01 in 0.80-1.25), and every fifth speaker is
# rms: past this many the draws would repeat.
MAX_SPEAKERS = 200


class FliteUnavailable(SynthesiserUnavailable):
    """flite is not installed."""


def _missing() -> FliteUnavailable:
    return FliteUnavailable(
        "flite is not installed (Debian: apt-get install -y flite); train with --flite 0 "
        "or install it"
    )


@dataclass(frozen=True)
class FliteSpeaker:
    voice: str
    pitch: int | None  # target mean F0 in Hz; None keeps the voice's own
    stretch: float  # duration_stretch: > 1 is slower

    @property
    def name(self) -> str:
        pitch = "own" if self.pitch is None else f"{self.pitch}"
        return f"flite:{self.voice}:f{pitch}:d{self.stretch:.2f}"


def available() -> bool:
    return shutil.which("flite") is not None


def synthetic_speakers(count: int, seed: int = 0) -> list[FliteSpeaker]:
    """``count`` distinct speakers: voices in turn, random pitch and duration stretch."""
    if not 0 <= count <= MAX_SPEAKERS:
        raise ValueError(f"count must be in [0, {MAX_SPEAKERS}], got {count}")
    rng = np.random.default_rng(seed)
    voices = list(VOICES)
    speakers: list[FliteSpeaker] = []
    while len(speakers) < count:
        voice = voices[len(speakers) % len(voices)]
        span = VOICES[voice]
        pitch = None if span is None else int(rng.integers(span[0], span[1] + 1))
        speaker = FliteSpeaker(voice, pitch, round(float(rng.uniform(0.8, 1.25)), 2))
        if speaker not in speakers:
            speakers.append(speaker)
    return speakers


def speak(text: str, voice: str, pitch: int | None = None, stretch: float = 1.0) -> np.ndarray:
    """``text`` spoken by flite's ``voice``, as float32 samples at 8 kHz."""
    if not available():
        raise _missing()
    command = ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch}"]
    if pitch is not None:
        command += ["--setf", f"int_f0_target_mean={pitch}"]
    result = subprocess.run([*command, "-t", text, "-o", "/dev/stdout"], capture_output=True)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"flite failed: {result.stderr.decode(errors='replace').strip()}")
    return wave_of(result.stdout)


def _clips_of(speaker: FliteSpeaker) -> list[Clip]:
    def say(word: str, factor: float) -> np.ndarray:
        return speak(word, speaker.voice, speaker.pitch, round(speaker.stretch * factor, 3))

    return digit_clips(speaker.name, say)


def synthetic_clips(
    count: int = 40, seed: int = 0, cache_dir: Path | str | None = None, threads: int = 2
) -> list[Clip]:
    """Clips of ``count`` flite speakers (20 each: every digit at two tempos).

    Raises `FliteUnavailable` when flite is missing, so callers can skip with a message.
    """
    if not available():
        raise _missing()
    cache = None if cache_dir is None else Path(cache_dir) / f"flite-{count}-{seed}.npz"
    return cached_clips(cache, _clips_of, synthetic_speakers(count, seed), threads)
