"""The synthetic speakers: flite's voices, the shared cache, and how training gathers them."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from multihead.apps.speech import espeak, flite
from multihead.apps.speech import train as speech_train
from multihead.apps.speech.data import Clip

needs_flite = pytest.mark.skipif(
    not flite.available(),
    reason="needs flite: apt-get install flite (make test installs it when run as root)",
)


def _pitch_hz(wave: np.ndarray, rate: int = 8000) -> float:
    """Median F0 of the loud 40 ms frames, from the autocorrelation peak in 60-400 Hz."""
    n = int(0.04 * rate)
    lo, hi = rate // 400, rate // 60
    loud = 0.3 * np.abs(wave).max()
    estimates = []
    for start in range(0, len(wave) - n, n // 2):
        frame = wave[start : start + n] - wave[start : start + n].mean()
        if np.abs(frame).max() < loud:
            continue
        ac = np.correlate(frame, frame, "full")[n - 1 :]
        estimates.append(rate / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(estimates))


def test_flite_speakers_are_distinct_deterministic_and_in_range() -> None:
    speakers = flite.synthetic_speakers(23, seed=5)
    assert len(set(speakers)) == 23
    assert speakers == flite.synthetic_speakers(23, seed=5)
    assert speakers != flite.synthetic_speakers(23, seed=6)
    voices = list(flite.VOICES)
    for i, speaker in enumerate(speakers):
        assert speaker.voice == voices[i % len(voices)]  # the voices in turn
        span = flite.VOICES[speaker.voice]
        if span is None:
            assert speaker.pitch is None
        else:
            assert speaker.pitch is not None and span[0] <= speaker.pitch <= span[1]
        assert 0.8 <= speaker.stretch <= 1.25
    assert len({s.name for s in speakers}) == 23
    with pytest.raises(ValueError, match="count"):
        flite.synthetic_speakers(-1)
    assert len(set(flite.synthetic_speakers(flite.MAX_SPEAKERS))) == flite.MAX_SPEAKERS
    with pytest.raises(ValueError, match=r"\[0, 200\]"):
        flite.synthetic_speakers(flite.MAX_SPEAKERS + 1)


def test_flite_missing_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flite.shutil, "which", lambda name: None)
    assert not flite.available()
    with pytest.raises(flite.FliteUnavailable, match="apt-get install -y flite"):
        flite.synthetic_clips(2)
    with pytest.raises(flite.FliteUnavailable, match="--flite 0"):
        flite.speak("seven", "kal16")


@needs_flite
def test_flite_speaks_a_digit_at_8khz_at_the_asked_pitch() -> None:
    low = flite.speak("nine", "kal16", pitch=90)
    high = flite.speak("nine", "kal16", pitch=160)
    for wave in (low, high):
        assert wave.dtype == np.float32 and 0.2 * 8000 < len(wave) < 1.5 * 8000
    # An independent pitch estimate lands near each target (within 15 %).
    assert _pitch_hz(low) == pytest.approx(90, rel=0.15)
    assert _pitch_hz(high) == pytest.approx(160, rel=0.15)
    slow = flite.speak("nine", "kal16", pitch=90, stretch=1.4)
    assert len(slow) > 1.2 * len(low)


@needs_flite
def test_flite_clips_say_every_digit_twice_per_speaker(tmp_path: Path) -> None:
    clips = flite.synthetic_clips(2, seed=0, cache_dir=tmp_path)
    assert len(clips) == 40
    for speaker in {c.speaker for c in clips}:
        mine = [c for c in clips if c.speaker == speaker]
        assert sorted(c.digit for c in mine) == sorted(list(range(10)) * 2)
        assert sorted({c.index for c in mine}) == [0, 1]
    assert (tmp_path / "flite-2-0.npz").is_file()


def test_cached_clips_writes_once_and_reads_back(tmp_path: Path) -> None:
    calls: list[str] = []

    def clips_of(name: str) -> list[Clip]:
        calls.append(name)
        return [Clip(d, name, 0, np.full(10 + d, d, dtype=np.float32)) for d in range(3)]

    cache = tmp_path / "sub" / "fake.npz"
    made = espeak.cached_clips(cache, clips_of, ["a", "b"], threads=2)
    assert calls == ["a", "b"] or sorted(calls) == ["a", "b"]
    assert cache.is_file()

    def refuse(name: str) -> list[Clip]:
        raise AssertionError("the cache should have been read")

    read = espeak.cached_clips(cache, refuse, ["a", "b"])
    assert [(c.digit, c.speaker, c.index) for c in read] == [
        (c.digit, c.speaker, c.index) for c in made
    ]
    for a, b in zip(read, made, strict=True):
        np.testing.assert_array_equal(a.wave, b.wave)


def test_training_gathers_both_engines_and_skips_a_missing_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake(engine: str):  # noqa: ANN202
        def clips(count: int, seed: int, cache: str) -> list[Clip]:
            return [Clip(d, f"{engine}:{i}", 0, np.zeros(8)) for i in range(count) for d in (1, 2)]

        return clips

    monkeypatch.setattr(espeak, "synthetic_clips", fake("espeak"))
    monkeypatch.setattr(flite, "synthetic_clips", fake("flite"))
    args = argparse.Namespace(espeak=3, flite=2, seed=0, synthetic_cache="unused")
    clips = speech_train.synthetic_speakers(args, main_process=True)
    assert sorted({c.speaker for c in clips}) == [
        "espeak:0", "espeak:1", "espeak:2", "flite:0", "flite:1",
    ]  # fmt: skip

    def missing(count: int, seed: int, cache: str) -> list[Clip]:
        raise flite.FliteUnavailable("flite is not installed")

    monkeypatch.setattr(flite, "synthetic_clips", missing)
    clips = speech_train.synthetic_speakers(args, main_process=True)
    assert {c.speaker.split(":")[0] for c in clips} == {"espeak"}
    assert "skipping the flite speakers: flite is not installed" in capsys.readouterr().out
    args.flite = 0  # off: not even tried
    assert len(speech_train.synthetic_speakers(args, main_process=True)) == 6


@pytest.mark.parametrize("flag", ["--synthetic-fraction", "--espeak-fraction", "--aug-prob"])
def test_shares_outside_zero_to_one_are_refused(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = speech_train.build_parser()
    assert parser.parse_args([flag, "0.25"]).__dict__[
        "synthetic_fraction" if "fraction" in flag else "aug_prob"
    ] == pytest.approx(0.25)
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "1.5"])
    assert "must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_the_flite_flag_is_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    parser = speech_train.build_parser()
    assert parser.parse_args(["--flite", "0"]).flite == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--flite", str(flite.MAX_SPEAKERS + 1)])
    assert "flite's voices would repeat" in capsys.readouterr().err
