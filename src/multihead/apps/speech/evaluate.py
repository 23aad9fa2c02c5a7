"""Word error rate of a speech encoder on the test recordings and on the unseen speaker.

Every digit is a word, so WER counts substituted, deleted and inserted digits over the
reference digits (jiwer). ``python -m multihead.apps.speech.evaluate RUN/model`` scores a
saved model on the fixed evaluation sets.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from ...models.speech import SpeechEncoder, SpeechEncoderConfig
from .data import UNSEEN_SPEAKER, Utterance, eval_set, load_clips, split
from .decode import batch_decode
from .features import FeatureConfig, log_mel

__all__ = [
    "EVAL_SEEDS",
    "evaluation_sets",
    "feature_config_of",
    "main",
    "pad_waves",
    "transcribe",
    "word_error_rate",
]

EVAL_SEEDS = {"test": 1001, "unseen": 2002}


def feature_config_of(config: SpeechEncoderConfig) -> FeatureConfig:
    """The front end a model was trained with, from its saved config."""
    return FeatureConfig(
        sample_rate=config.sample_rate,
        n_fft=config.n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
        f_min=config.f_min,
        scale=config.mel_scale,
    )


def pad_waves(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad waveforms into (batch, samples), with their lengths."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return batch, lengths


def evaluation_sets(
    size: int = 300, unseen_speaker: str = UNSEEN_SPEAKER, clips: list | None = None
) -> dict[str, list[Utterance]]:
    """The fixed evaluation utterances: from the test recordings and from the unseen speaker."""
    parts = split(clips if clips is not None else load_clips(), unseen_speaker)
    return {name: eval_set(parts[name], size, seed) for name, seed in EVAL_SEEDS.items()}


@torch.no_grad()
def transcribe(
    model: SpeechEncoder,
    utterances: Sequence[Utterance],
    beam: int | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Hypotheses (space-separated digits) for ``utterances``; ``beam`` None means greedy."""
    model.eval()
    features = feature_config_of(model.config)
    # Sorting by length wastes less compute on padding.
    order = sorted(range(len(utterances)), key=lambda i: len(utterances[i].wave))
    hyps: list[str] = [""] * len(utterances)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        waves, lengths = pad_waves([utterances[i].wave for i in chunk])
        feats, frames = log_mel(waves, lengths, features)
        log_probs, out_lengths = model(feats, frames)
        for i, digits in zip(chunk, batch_decode(log_probs, out_lengths, beam), strict=True):
            hyps[i] = " ".join(str(d) for d in digits)
    return hyps


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (total edits / total reference words) with jiwer."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    # jiwer refuses empty hypotheses strings in some versions: score them as all deletions.
    hyps = [h if h else "<empty>" for h in hypotheses]
    return float(jiwer.wer(list(references), hyps))


def score(
    model: SpeechEncoder, sets: dict[str, list[Utterance]], beams: Sequence[int | None] = (None, 8)
) -> dict[str, float]:
    """WER (in %) of every set with every decoder: keys like ``test_wer_greedy``."""
    results: dict[str, float] = {}
    for name, utterances in sets.items():
        refs = [u.text for u in utterances]
        for beam in beams:
            tag = "greedy" if beam is None else f"beam{beam}"
            tick = time.monotonic()
            hyps = transcribe(model, utterances, beam)
            results[f"{name}_wer_{tag}"] = round(100 * word_error_rate(refs, hyps), 3)
            results[f"{name}_seconds_{tag}"] = round(time.monotonic() - tick, 2)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="directory written by save_pretrained")
    parser.add_argument("--size", type=int, default=300, help="utterances per evaluation set")
    parser.add_argument("--beam", type=int, default=8)
    parser.add_argument("--unseen-speaker", default=UNSEEN_SPEAKER)
    args = parser.parse_args(argv)
    model = SpeechEncoder.from_pretrained(args.model)
    sets = evaluation_sets(args.size, args.unseen_speaker)
    print(json.dumps(score(model, sets, (None, args.beam)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
