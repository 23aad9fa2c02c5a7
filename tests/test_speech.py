"""Speech app: splits, features, CTC decoding and a tiny model that learns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from multihead.apps.speech import augment, data, decode, espeak, features
from multihead.models import SpeechEncoder, SpeechEncoderConfig


@pytest.fixture(scope="module")
def index_clips() -> list[data.Clip]:
    """Every FSDD recording as a Clip with a short dummy wave: the splits need no audio."""
    rows = data.read_index(data.DATA_DIR / "fsdd-digits.tsv")
    wave = np.full(400, 0.1, dtype=np.float32)
    return [data.Clip(int(r["digit"]), str(r["speaker"]), int(r["index"]), wave) for r in rows]


# -- data -----------------------------------------------------------------------------------------
def test_splits_are_disjoint_by_recording_and_speaker(index_clips: list[data.Clip]) -> None:
    parts = data.split(index_clips)
    keys = {name: {(c.digit, c.speaker, c.index) for c in part} for name, part in parts.items()}
    assert sum(len(k) for k in keys.values()) == len(index_clips) == 3000
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["unseen"]
    assert not keys["test"] & keys["unseen"]
    speakers = {name: {c.speaker for c in part} for name, part in parts.items()}
    assert speakers["unseen"] == {data.UNSEEN_SPEAKER}
    assert data.UNSEEN_SPEAKER not in speakers["train"] | speakers["test"]
    assert {c.index for c in parts["test"]} == set(data.TEST_INDICES)
    assert min(c.index for c in parts["train"]) == 5
    with pytest.raises(ValueError, match="unseen_speaker"):
        data.split(index_clips, unseen_speaker="nobody")


def test_utterances_are_built_only_from_their_split(index_clips: list[data.Clip]) -> None:
    parts = data.split(index_clips)
    test = data.eval_set(parts["test"], 40, seed=1)
    unseen = data.eval_set(parts["unseen"], 20, seed=2)
    assert all(set(u.takes) <= data.TEST_INDICES for u in test)
    assert all(u.speaker != data.UNSEEN_SPEAKER for u in test)
    assert all(u.speaker == data.UNSEEN_SPEAKER for u in unseen)
    assert all(1 <= len(u.digits) <= 7 and len(u.takes) == len(u.digits) for u in test)
    again = data.eval_set(parts["test"], 40, seed=1)  # fixed seeds: the same set every time
    assert [u.text for u in again] == [u.text for u in test]
    assert np.array_equal(again[0].wave, test[0].wave)


def test_noisy_margins_only_when_asked(index_clips: list[data.Clip]) -> None:
    clips = data.split(index_clips)["train"]
    plain = data.UtteranceSampler(clips, data.SynthConfig(), seed=4).sample()
    config = data.SynthConfig(margin_prob=1.0, margin=(0.1, 0.1))
    padded = data.UtteranceSampler(clips, config, seed=4).sample()
    assert padded.digits == plain.digits  # same draws up to the margins
    assert len(padded.wave) > len(plain.wave) + 0.2 * 8000 * len(plain.digits) - 8000
    rng = np.random.default_rng(0)
    falling = np.abs(np.fft.rfft(augment.colored_noise(8000, rng, tilt=-2.0))) ** 2
    rising = np.abs(np.fft.rfft(augment.colored_noise(8000, rng, tilt=1.0))) ** 2
    assert falling[:400].mean() > 10 * falling[-400:].mean()
    assert rising[-400:].mean() > 10 * rising[:400].mean()


def test_training_batches_are_deterministic_per_epoch(index_clips: list[data.Clip]) -> None:
    from multihead.apps.speech.train import TrainingBatches

    clips = data.split(index_clips)["train"]
    config = augment.AugmentConfig()
    batches = TrainingBatches(clips, [], features.FeatureConfig(), config, 4, 8, 0.0, 0, 4)
    first = [b.feats for b in batches(3)]  # through the prefetching thread
    again = [b.feats for b in batches._batches(3)]
    assert len(first) == 8 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], next(iter(batches(4))).feats)
    assert batches.augment_at(0).prob == 0.0 and batches.augment_at(4).prob == 1.0


# -- features -------------------------------------------------------------------------------------
def test_log_mel_shape_padding_and_normalisation() -> None:
    config = features.FeatureConfig(n_mels=40)
    waves = torch.randn(3, 8000) * torch.linspace(0.1, 1, 8000)
    lengths = torch.tensor([8000, 4000, 1600])
    feats, frames = features.log_mel(waves, lengths, config)
    assert feats.shape == (3, 8000 // 80 + 1, 40)
    assert frames.tolist() == [101, 51, 21]
    assert feats[1, 51:].abs().max() == 0 and feats[2, 21:].abs().max() == 0
    real = feats[1, :51]
    assert torch.allclose(real.mean(0), torch.zeros(40), atol=1e-4)
    assert torch.allclose(real.std(0, unbiased=False), torch.ones(40), atol=1e-2)
    warped, _ = features.log_mel(waves, lengths, config, warps=torch.tensor([0.9, 1.0, 1.1]))
    assert torch.allclose(warped[1], feats[1], atol=1e-5)  # warp 1.0 changes nothing
    with pytest.raises(ValueError, match="waves"):
        features.log_mel(torch.randn(8000), config=config)


@pytest.mark.parametrize("scale", ["htk", "slaney"])
@pytest.mark.parametrize("warp", [1.0, 0.88, 1.12])
def test_mel_filterbank_triangles(scale: str, warp: float) -> None:
    # A fine frequency grid samples every triangle near its apex.
    bank = features.mel_filterbank(8193, 8000, 40, 20.0, 4000.0, scale, warp)
    assert bank.shape == (40, 8193) and bank.min() >= 0
    assert torch.allclose(bank.max(1).values, torch.ones(40), atol=0.01)
    centres = bank.argmax(1)
    assert (centres[1:] > centres[:-1]).all()  # strictly increasing centre frequencies
    # Neighbouring triangles overlap: the left one falls to 0 where the right one peaks.
    assert bank[torch.arange(39), centres[1:]].max() < 0.01


def test_mel_scales() -> None:
    hz = torch.tensor([0.0, 500.0, 1000.0, 3000.0], dtype=torch.float64)
    for scale in ("htk", "slaney"):
        assert torch.allclose(features.mel_to_hz(features.hz_to_mel(hz, scale), scale), hz)
    assert math.isclose(float(features.hz_to_mel(torch.tensor(1000.0), "slaney")), 15.0)
    assert math.isclose(
        float(features.hz_to_mel(torch.tensor(700.0), "htk")), 2595 * math.log10(2), rel_tol=1e-6
    )


def test_augmentations() -> None:
    wave = np.sin(np.arange(8001) * 0.3).astype(np.float32)
    assert abs(len(augment.speed_perturb(wave, 1.1)) - 8001 / 1.1) < 8001 * 0.015
    assert len(augment.resample(wave, 8000, 16000)) == 16002
    feats = torch.ones(2, 100, 40)
    config = augment.AugmentConfig(freq_masks=2, freq_width=8, time_masks=2, time_width=10)
    masked = augment.spec_augment(feats, torch.tensor([100, 50]), config, torch.Generator())
    assert masked[:, :, :].eq(0).any() and feats.eq(1).all()  # masks a copy
    assert masked[1].eq(0).all(-1).sum() <= 0.15 * 50  # time masks respect the budget


def _peak_hz(wave: np.ndarray, rate: int = 8000) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n=1 << 16))
    return float(np.argmax(spectrum)) * rate / (1 << 16)


@pytest.mark.parametrize("factor", [0.85, 0.9, 1.1, 1.2])
def test_speed_perturbation_moves_a_sine_by_the_factor(factor: float) -> None:
    wave = np.sin(2 * np.pi * 500 * np.arange(8000) / 8000).astype(np.float32)
    faster = augment.speed_perturb(wave, factor)
    assert _peak_hz(faster) == pytest.approx(500 * factor, rel=0.01)
    assert len(faster) == pytest.approx(8000 / factor, rel=0.01)


@pytest.mark.parametrize("alpha", [0.85, 0.9, 1.1, 1.15])
def test_vtlp_moves_the_filters_below_the_knee_by_alpha(alpha: float) -> None:
    # Warped filters read the spectrum at alpha times each centre: a tone at f excites the
    # filter that was centred at f / alpha.
    hz = torch.tensor([200.0, 500.0, 1000.0, 2000.0], dtype=torch.float64)
    warped = features.vtlp_warp(hz, alpha, 4000.0)
    torch.testing.assert_close(warped, hz * alpha)
    edges = torch.tensor([0.0, 4000.0], dtype=torch.float64)
    torch.testing.assert_close(features.vtlp_warp(edges, alpha, 4000.0), edges)  # ends fixed
    plain = features.mel_filterbank(8193, 8000, 40, 20.0, 4000.0)
    bank = features.mel_filterbank(8193, 8000, 40, 20.0, 4000.0, warp=alpha)
    hz_per_bin = 4000 / 8192
    low = slice(2, 20)  # centres well below the knee (0.8 * Nyquist * min(alpha, 1) / alpha)
    ratio = bank.argmax(1)[low].double() / plain.argmax(1)[low].double()
    assert torch.allclose(ratio, torch.full_like(ratio, alpha), atol=3 * hz_per_bin / 100)


def test_speech_flags_set_the_augmentation() -> None:
    from multihead.apps.speech import train

    def config(*flags: str) -> augment.AugmentConfig:
        return train.augment_config(train.build_parser().parse_args(list(flags)))

    # The defaults are the recipe's: speed perturbation always, the rest half the time.
    assert config() == augment.AugmentConfig(speed=(0.8, 1.25), prob=0.5, speed_prob=1.0)
    custom = config(
        "--speed-range", "0.8", "1.25", "--vtlp-range", "0.9", "1.2", "--freq-masks", "3",
        "--freq-width", "10", "--time-masks", "4", "--time-width", "12", "--time-ratio", "0.3",
        "--aug-prob", "0.8",
    )  # fmt: skip
    assert custom == augment.AugmentConfig(
        speed=(0.8, 1.25), vtlp=(0.9, 1.2), freq_masks=3, freq_width=10, time_masks=4,
        time_width=12, time_ratio=0.3, prob=0.8, speed_prob=1.0,
    )  # fmt: skip
    off = config("--no-speed", "--no-vtlp", "--no-specaug")
    assert off.speed is None and off.vtlp is None and not off.spec_augment
    with pytest.raises(ValueError, match="speed"):
        config("--speed-range", "1.2", "0.8")


def test_speed_has_its_own_probability_and_ramps_with_the_rest() -> None:
    from multihead.apps.speech import train

    parse = train.build_parser().parse_args
    assert augment.AugmentConfig(prob=0.3).speed_chance == 0.3  # None follows prob
    config = train.augment_config(parse(["--speed-prob", "1", "--aug-prob", "0.4"]))
    assert (config.speed_chance, config.prob) == (1.0, 0.4)
    assert train.augment_config(parse([])).speed_chance == 1.0  # the recipe's
    half = config.scaled(0.5)
    assert (half.speed_chance, half.prob) == (0.5, 0.2)
    with pytest.raises(SystemExit):
        parse(["--speed-prob", "1.5"])
    with pytest.raises(ValueError, match="speed_prob"):
        augment.AugmentConfig(speed_prob=-0.1)


@pytest.mark.parametrize(("prob", "speed_prob", "changed"), [(0.0, 1.0, 8), (1.0, 0.0, 0)])
def test_speed_probability_decides_which_utterances_change_length(prob, speed_prob, changed):
    from multihead.apps.speech import train
    from multihead.apps.speech.data import Utterance

    tone = np.sin(np.arange(4000) * 0.3).astype(np.float32)
    utterances = [Utterance((1,), "x", tone) for _ in range(8)]
    feature_config = features.FeatureConfig()
    plain = train.make_batch(utterances, feature_config)
    config = augment.AugmentConfig(
        speed=(0.8, 0.8), vtlp=None, spec_augment=False, prob=prob, speed_prob=speed_prob
    )
    batch = train.make_batch(utterances, feature_config, config)
    assert int((batch.frames != plain.frames).sum()) == changed


def test_spec_augment_strength() -> None:
    feats = torch.ones(1, 200, 40)
    strong = augment.AugmentConfig(freq_masks=4, freq_width=10, time_masks=6, time_width=20,
                                   time_ratio=0.4)  # fmt: skip
    masked_bins, masked_frames = [], []
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        out = augment.spec_augment(feats, torch.tensor([200]), strong, generator)
        masked_bins.append(int(out[0].eq(0).all(0).sum()))
        masked_frames.append(int(out[0].eq(0).all(1).sum()))
    assert max(masked_bins) <= 4 * 10 and max(masked_frames) <= 0.4 * 200
    assert max(masked_frames) > 0.15 * 200  # more than the default budget allows


def test_leave_one_speaker_out_summary(tmp_path: Path) -> None:
    import json

    from multihead.apps.speech import loso

    def write(folder: Path, speaker: str, test: float, unseen: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        results = {"steps": 100, "train_seconds": 60.0, "test_wer_greedy": test,
                   "unseen_wer_greedy": unseen, "args": {"unseen_speaker": speaker}}  # fmt: skip
        (folder / "results.json").write_text(json.dumps(results))

    write(tmp_path, "lucas", 2.0, 10.0)
    write(tmp_path / "loso" / "george", "george", 3.0, 4.0)
    write(tmp_path / "loso" / "jackson", "jackson", 1.0, 7.0)
    runs = loso.gather(tmp_path)
    assert list(runs) == ["lucas", "george", "jackson"]
    both = loso.summary(runs)
    assert both["mean"] == {"test_wer_greedy": 2.0, "unseen_wer_greedy": 7.0}
    assert both["worst"] == {"test_wer_greedy": 3.0, "unseen_wer_greedy": 10.0}
    assert "| **worst** | | | 3.00 % | 10.00 % |" in loso.table(runs)
    write(tmp_path / "loso" / "again", "lucas", 2.0, 10.0)
    with pytest.raises(ValueError, match="lucas"):
        loso.gather(tmp_path)


def test_espeak_missing_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(espeak.shutil, "which", lambda name: None)
    assert not espeak.available()
    with pytest.raises(espeak.EspeakUnavailable, match="apt-get install -y espeak-ng"):
        espeak.synthetic_clips(2)


@pytest.mark.skipif(
    not espeak.available(),
    reason="needs espeak-ng: apt-get install espeak-ng (make test installs it when run as root)",
)
def test_espeak_speaks_a_digit_at_8khz() -> None:
    wave = espeak.speak("seven", "en-us", "m3", 50, 170)
    assert wave.dtype == np.float32 and 0.2 * 8000 < len(wave) < 1.5 * 8000


# -- decoding -------------------------------------------------------------------------------------
def _log_probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


def test_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    b, one, two = 0, 2, 3  # token d + 1 is digit d
    path = [one, one, b, one, two, two, b, b, two]
    logits = torch.full((len(path), decode.VOCAB_SIZE), -5.0)
    logits[torch.arange(len(path)), torch.tensor(path)] = 5.0
    tokens = decode.greedy_decode(logits.log_softmax(-1))
    assert tokens == [one, one, two, two]
    assert decode.tokens_to_digits(tokens) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="log_probs"):
        decode.greedy_decode(torch.zeros(2, 3, 4))


def test_prefix_beam_search_equals_greedy_when_peaked() -> None:
    generator = torch.Generator().manual_seed(0)
    path = torch.randint(0, decode.VOCAB_SIZE, (30,), generator=generator)
    logits = torch.randn(30, decode.VOCAB_SIZE, generator=generator)
    logits[torch.arange(30), path] += 12.0
    log_probs = logits.log_softmax(-1)
    best, score = decode.prefix_beam_search(log_probs, beam=4)
    assert best == decode.greedy_decode(log_probs)
    assert -1.0 < score <= 0.0


def test_prefix_beam_search_sums_alignments() -> None:
    # Greedy's best path is blank, blank (p 0.36, label ""), but the label "a" has three
    # paths: a a, a -, - a with p 0.16 + 0.24 + 0.24 = 0.64.
    log_probs = _log_probs([[0.6, 0.4], [0.6, 0.4]])
    assert decode.greedy_decode(log_probs) == []
    best, score = decode.prefix_beam_search(log_probs, beam=3)
    assert best == [1]
    assert math.isclose(score, math.log(0.64), rel_tol=1e-9)
    # "a a" needs a blank between: with three frames it has exactly one path, a - a.
    three = _log_probs([[0.2, 0.8], [0.9, 0.1], [0.2, 0.8]])
    assert decode.prefix_beam_search(three, beam=4)[0] == [1, 1]


# -- model ----------------------------------------------------------------------------------------
def _tiny() -> SpeechEncoder:
    torch.manual_seed(0)
    config = SpeechEncoderConfig(
        n_mels=16,
        d_model=32,
        num_heads=2,
        num_layers=1,
        dim_feedforward=64,
        conv_channels=8,
        dropout=0.0,
    )
    return SpeechEncoder(config)


def test_tiny_model_loss_falls() -> None:
    model = _tiny()
    generator = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 60, 16, generator=generator)
    frames = torch.tensor([60, 50, 40, 30])
    targets = torch.tensor([2, 3, 4, 5, 6, 7, 1, 2, 2])
    target_lengths = torch.tensor([3, 3, 1, 2])
    log_probs, out_lengths = model(feats, frames)
    assert log_probs.shape == (4, 14, 11) and out_lengths.tolist() == [14, 11, 9, 6]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model.ctc_loss(feats, frames, targets, target_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_model_round_trip_and_bad_input(tmp_path) -> None:
    model = _tiny().eval()
    feats = torch.randn(2, 40, 16)
    model.save_pretrained(tmp_path)
    loaded = SpeechEncoder.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded(feats)[0], model(feats)[0])
    with pytest.raises(ValueError, match="feats"):
        model(torch.randn(2, 40, 15))
    with pytest.raises(ValueError, match="lengths"):
        model(feats, torch.tensor([40, 3]))
    with pytest.raises(TypeError, match="feats"):
        model(feats.numpy())


@pytest.mark.parametrize("positions", ["rope", "relative"])
def test_relative_positions_can_replace_the_sinusoids(tmp_path: Path, positions: str) -> None:
    import json

    from multihead.apps.speech import train
    from multihead.attention_config import AttentionConfig

    torch.manual_seed(0)
    config = SpeechEncoderConfig(n_mels=16, d_model=16, num_heads=2, num_layers=1,
                                 dim_feedforward=32, conv_channels=4, dropout=0.0,
                                 attention=AttentionConfig(positions=positions),
                                 absolute_positions=False)  # fmt: skip
    model = SpeechEncoder(config).eval()
    feats = torch.randn(2, 40, 16)
    # The oracle: the same weights with the sinusoid table zeroed add nothing.
    twin = SpeechEncoder(SpeechEncoderConfig(**{**vars(config), "absolute_positions": True}))
    twin.load_state_dict(model.state_dict())
    twin.positions.pe.zero_()
    torch.testing.assert_close(model(feats)[0], twin.eval()(feats)[0])
    with_sinusoids = SpeechEncoder(twin.config).eval()
    with_sinusoids.load_state_dict(model.state_dict())
    assert not torch.allclose(with_sinusoids(feats)[0], model(feats)[0])
    model.save_pretrained(tmp_path)
    assert SpeechEncoder.from_pretrained(tmp_path).config == config
    # Configs saved before the field existed had the sinusoids.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["absolute_positions"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert SpeechEncoder.from_pretrained(tmp_path).config.absolute_positions
    parse = train.build_parser().parse_args
    built = train.build_model_config(parse(["--positions", positions]))
    assert built.attention == AttentionConfig(positions=positions)
    assert not built.absolute_positions
    plain = train.build_model_config(parse(["--positions", "sinusoidal"]))
    assert plain.absolute_positions and plain.attention is None
    assert train.build_model_config(parse([])).attention == AttentionConfig(positions="rope")
    with pytest.raises(TypeError, match="absolute_positions"):
        SpeechEncoderConfig(absolute_positions=1)


@pytest.mark.parametrize(
    ("final_wer", "average_wer", "kept"), [(0.2, 0.2, "average"), (0.1, 0.2, "final")]
)
def test_averaged_weights_are_kept_only_if_no_worse(monkeypatch, final_wer, average_wer, kept):
    from types import SimpleNamespace

    from multihead.apps.speech import train
    from multihead.training import WeightAverage

    torch.manual_seed(0)
    model = SpeechEncoder(SpeechEncoderConfig(d_model=16, num_heads=2, num_layers=1,
                                              dim_feedforward=32, conv_channels=4))  # fmt: skip
    final = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, every=1, start=0.0)
    average(SimpleNamespace(step=1, progress=lambda: 1.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average(SimpleNamespace(step=2, progress=lambda: 1.0))
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1.0)  # back to the final weights; the average is final + 0.5
    scores = iter([final_wer, average_wer])
    monkeypatch.setattr(train, "transcribe", lambda model, utts: ["x"] * len(utts))
    monkeypatch.setattr(train, "wer", lambda refs, hyps: next(scores))
    held_out = [SimpleNamespace(text="1 2")]
    chosen = train.choose_average(model, average, held_out)
    assert chosen.startswith(kept)
    state = model.state_dict()
    for key, value in final.items():
        want = value + 0.5 if kept == "average" and value.is_floating_point() else value
        torch.testing.assert_close(state[key], want)


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "speech-digits"


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped speech model")
def test_shipped_model_meets_the_wer_targets() -> None:
    """The model in the repo, on the full fixed evaluation sets (jiwer, greedy decoding):
    WER ≤ 2.5 % on the test recordings and ≤ 6 % on the speaker never heard in training."""
    from multihead.apps.speech.evaluate import evaluation_sets, score

    model = SpeechEncoder.from_pretrained(SHIPPED)
    results = score(model, evaluation_sets(300), beams=(None,))
    assert results["test_wer_greedy"] <= 2.5
    assert results["unseen_wer_greedy"] <= 6.0
