"""Free Spoken Digit Dataset: recordings, the splits, and synthesised digit-string utterances.

FSDD holds single digits (6 speakers × 10 digits × 50 takes, 8 kHz). Speech recognition needs
sentences, so an utterance here is 1–7 recordings of one speaker joined with random pauses,
then scaled and mixed with noise. Splits are made on recordings first, and utterances are
built only inside a split, so no recording and no held-out speaker can leak into training.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from ..shipped import DATA_VARIABLE, data_file
from .augment import add_noise, colored_noise

__all__ = [
    "DATA_DIR",
    "SAMPLE_RATE",
    "TEST_INDICES",
    "UNSEEN_SPEAKER",
    "Clip",
    "SynthConfig",
    "Utterance",
    "UtteranceSampler",
    "eval_set",
    "load_clips",
    "read_index",
    "split",
]

DATA_DIR = data_file("fsdd")
SAMPLE_RATE = 8000
# FSDD's own test split: takes 0-4 of every digit and speaker.
TEST_INDICES = frozenset(range(5))
# The held-out speaker: German-accented English, like yweweler who stays in training, so the
# unseen-speaker set measures a new voice and microphone rather than an accent nobody in
# training has; lucas is also the dataset's most recent contributor (a "new user").
UNSEEN_SPEAKER = "lucas"


@dataclass(frozen=True)
class Clip:
    """One spoken digit: a recording of FSDD or a synthetic one."""

    digit: int
    speaker: str
    index: int
    wave: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class Utterance:
    """A digit string, its audio and who said it."""

    digits: tuple[int, ...]
    speaker: str
    wave: np.ndarray = field(repr=False, compare=False)
    takes: tuple[int, ...] = ()  # the recording index of each digit: splits are checkable

    @property
    def text(self) -> str:
        """The reference transcript for WER: one word per digit."""
        return " ".join(str(d) for d in self.digits)


class _Take(Protocol):
    @property
    def speaker(self) -> str: ...
    @property
    def index(self) -> int: ...


T = TypeVar("T", bound=_Take)


def read_index(path: Path | str) -> list[dict[str, int | str]]:
    """The TSV that says where each recording sits in the concatenated FLAC."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    expected = {"digit", "speaker", "index", "start", "frames"}
    if not rows or set(rows[0]) != expected:
        raise ValueError(f"{path} must have the columns {sorted(expected)}")
    ints = ("digit", "index", "start", "frames")
    return [{k: (int(v) if k in ints else v) for k, v in row.items()} for row in rows]


def load_clips(root: Path | str = DATA_DIR) -> list[Clip]:
    """All 3,000 FSDD recordings, sliced out of ``fsdd-digits.flac``."""
    import soundfile

    root = Path(root)
    if not (root / "fsdd-digits.flac").is_file():
        raise FileNotFoundError(
            f"{root / 'fsdd-digits.flac'} not found: FSDD ships with the package and in the "
            f"repository's data/fsdd/ (or set {DATA_VARIABLE} to a folder holding fsdd/)"
        )
    audio, rate = soundfile.read(root / "fsdd-digits.flac", dtype="float32")
    if rate != SAMPLE_RATE:
        raise ValueError(f"expected {SAMPLE_RATE} Hz audio, got {rate} Hz")
    clips = []
    for row in read_index(root / "fsdd-digits.tsv"):
        start, frames = int(row["start"]), int(row["frames"])
        wave = audio[start : start + frames]
        clips.append(Clip(int(row["digit"]), str(row["speaker"]), int(row["index"]), wave))
    return clips


def split(takes: Iterable[T], unseen_speaker: str = UNSEEN_SPEAKER) -> dict[str, list[T]]:
    """Split recordings three ways, disjoint by recording and by speaker.

    ``test``: takes 0-4 of the other speakers; ``unseen``: every take of ``unseen_speaker``;
    ``train``: takes 5-49 of the other speakers.
    """
    takes = list(takes)
    if unseen_speaker not in {t.speaker for t in takes}:
        raise ValueError(f"unseen_speaker {unseen_speaker!r} is not among the speakers")
    parts: dict[str, list[T]] = {"train": [], "test": [], "unseen": []}
    for t in takes:
        if t.speaker == unseen_speaker:
            parts["unseen"].append(t)
        elif t.index in TEST_INDICES:
            parts["test"].append(t)
        else:
            parts["train"].append(t)
    return parts


@dataclass(frozen=True)
class SynthConfig:
    """How recordings are joined into an utterance. Ranges (lo, hi) are sampled uniformly."""

    min_digits: int = 1
    max_digits: int = 7
    pause: tuple[float, float] = (0.02, 0.35)  # seconds between digits
    edge: tuple[float, float] = (0.05, 0.3)  # seconds of silence before and after
    level_rms: float = 0.05  # each clip is scaled to this RMS before its own gain
    clip_gain_db: tuple[float, float] = (-3.0, 3.0)
    gain_db: tuple[float, float] = (-6.0, 6.0)
    snr_db: tuple[float, float] = (15.0, 40.0)
    # Training only (0 keeps the evaluation sets as they are): with this probability a clip
    # gets untrimmed-looking margins, its own room noise around and under it, as some FSDD
    # speakers' recordings have. Without it a model trained on tightly trimmed clips reads a
    # burst of noise after a word as a fricative ("six").
    margin_prob: float = 0.0
    margin: tuple[float, float] = (0.0, 0.3)  # seconds before and after the clip
    margin_snr_db: tuple[float, float] = (5.0, 30.0)  # clip power over its noise
    margin_tilt: tuple[float, float] = (-2.0, 1.0)  # noise spectrum ~ f^tilt
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )


class UtteranceSampler:
    """Draws utterances of one speaker at a time from a set of clips.

    Each speaker's clips are dealt from a shuffled deck, so a fixed-size evaluation set uses
    every recording about equally often.
    """

    def __init__(
        self, clips: Sequence[Clip], config: SynthConfig | None = None, seed: int = 0
    ) -> None:
        if not clips:
            raise ValueError("clips must not be empty")
        self.config = config or SynthConfig()
        self.rng = np.random.default_rng(seed)
        by_speaker: dict[str, list[Clip]] = defaultdict(list)
        for clip in clips:
            by_speaker[clip.speaker].append(clip)
        self.speakers = sorted(by_speaker)
        self.clips = {s: by_speaker[s] for s in self.speakers}
        self._decks: dict[str, list[Clip]] = {s: [] for s in self.speakers}

    def _deal(self, speaker: str) -> Clip:
        deck = self._decks[speaker]
        if not deck:
            pool = self.clips[speaker]
            deck.extend(pool[i] for i in self.rng.permutation(len(pool)))
        return deck.pop()

    def _with_margins(self, wave: np.ndarray) -> np.ndarray:
        c, rng = self.config, self.rng
        before, after = (int(rng.uniform(*c.margin) * c.sample_rate) for _ in range(2))
        padded = np.pad(wave, (before, after))
        noise = colored_noise(len(padded), rng, float(rng.uniform(*c.margin_tilt)))
        power = float(np.mean(wave**2)) / 10 ** (rng.uniform(*c.margin_snr_db) / 10)
        return padded + np.sqrt(power) * noise

    def sample(self, speaker: str | None = None) -> Utterance:
        """One utterance: 1-7 clips of one speaker, pauses, gain and noise."""
        c, rng = self.config, self.rng
        speaker = speaker or self.speakers[int(rng.integers(len(self.speakers)))]
        count = int(rng.integers(c.min_digits, c.max_digits + 1))
        chosen = [self._deal(speaker) for _ in range(count)]

        def silence(span: tuple[float, float]) -> np.ndarray:
            return np.zeros(int(rng.uniform(*span) * c.sample_rate), dtype=np.float32)

        pieces = [silence(c.edge)]
        for i, clip in enumerate(chosen):
            rms = float(np.sqrt(np.mean(clip.wave**2))) + 1e-8
            gain = c.level_rms / rms * 10 ** (rng.uniform(*c.clip_gain_db) / 20)
            wave = clip.wave * gain
            if c.margin_prob > 0 and rng.random() < c.margin_prob:
                wave = self._with_margins(wave)
            pieces.append(wave)
            pieces.append(silence(c.pause if i < count - 1 else c.edge))
        wave = np.concatenate(pieces).astype(np.float32)
        wave = add_noise(wave, float(rng.uniform(*c.snr_db)), rng)
        wave *= 10 ** (rng.uniform(*c.gain_db) / 20)
        digits = tuple(clip.digit for clip in chosen)
        takes = tuple(clip.index for clip in chosen)
        return Utterance(digits, speaker, np.clip(wave, -1.0, 1.0), takes)


def eval_set(
    clips: Sequence[Clip], size: int, seed: int, config: SynthConfig | None = None
) -> list[Utterance]:
    """A fixed evaluation set: ``size`` utterances, speakers taken in turn, a fixed seed."""
    sampler = UtteranceSampler(clips, config, seed)
    return [sampler.sample(sampler.speakers[i % len(sampler.speakers)]) for i in range(size)]
