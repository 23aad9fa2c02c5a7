"""``multihead eval translate|image|speech``: a model scored on its fixed test split.

Each prints its field's metric with the number of items it was measured on, for the shipped
model by default (``--model DIR`` for another one saved by the same app).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..apps.limits import BEAM, MAX_UTTERANCES, bounded_int, decode_batch
from ..apps.shipped import shipped_model
from .errors import UserError

__all__ = ["add_command"]

SHIPPED = {"translate": "translate-en-fr", "image": "image-digits", "speech": "speech-digits"}
COUNT = bounded_int(1, 10**6, "a count of test items")


def add_command(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score a model on its fixed test split",
        description="Score a model (default: the shipped one) on its app's fixed test split: "
        "translate: BLEU and chrF on 2,003 test sentences; image: accuracy on 360 test "
        "images; speech: WER on 300 utterances of the test recordings and of an unseen speaker.",
    )
    evaluate.add_argument("task", choices=list(SHIPPED), metavar="TASK", help=", ".join(SHIPPED))
    evaluate.add_argument("--model", type=Path, help="model directory (default: the shipped one)")
    evaluate.add_argument(
        "--sentences",
        "--utterances",
        dest="count",
        type=COUNT,
        help="translate: this many test sentences (default all); "
        f"speech: utterances per set (300, at most {MAX_UTTERANCES})",
    )
    evaluate.add_argument("--beam", type=BEAM, help="beam width (translate 5, speech 8)")
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    directory = args.model or shipped_model(SHIPPED[args.task])
    if args.task == "image":
        for flag, value in (("--sentences", args.count), ("--beam", args.beam)):
            if value is not None:
                raise UserError(f"eval image scores all 360 test images and takes no {flag}")
    if not (directory / "config.json").is_file():
        raise UserError(f"no {args.task} model in {directory}/ (config.json missing)")
    print(f"model: {directory}", flush=True)
    {"translate": _translate, "image": _image, "speech": _speech}[args.task](directory, args)
    return 0


def _translate(directory: Path, args: argparse.Namespace) -> None:
    from ..apps.translate import demo
    from ..apps.translate.data import load_splits
    from ..apps.translate.evaluate import evaluate_pairs

    model, sp = demo.load(directory)
    beam = 5 if args.beam is None else args.beam
    scores, _ = evaluate_pairs(
        model, sp, load_splits().test, limit=args.count, beam_size=beam,
        batch_size=decode_batch(beam),
    )  # fmt: skip
    print(
        f"test: BLEU {scores.bleu:.2f}, chrF {scores.chrf:.2f} on {scores.sentences} sentences "
        f"(beam {beam}; {scores.bleu_signature})"
    )


def _image(directory: Path, args: argparse.Namespace) -> None:
    from ..apps.image import load_split, predict
    from ..models import ViT

    model = ViT.from_pretrained(directory)
    split = load_split()
    total = len(split.test_labels)
    with torch.no_grad():
        for name, tta in (("test", False), ("test, with test-time shifts", True)):
            right = int(
                (predict(model, split.test_images, tta=tta).argmax(-1) == split.test_labels).sum()
            )
            print(f"{name}: accuracy {100 * right / total:.2f} % ({right}/{total} images)")


def _speech(directory: Path, args: argparse.Namespace) -> None:
    from ..apps.speech.evaluate import evaluation_sets, score
    from ..models import SpeechEncoder

    size = 300 if args.count is None else args.count
    if size > MAX_UTTERANCES:
        raise UserError(
            f"--utterances must be at most {MAX_UTTERANCES} (each set is held in memory), "
            f"got {size}"
        )
    beam = 8 if args.beam is None else args.beam
    model = SpeechEncoder.from_pretrained(directory)
    results = score(model, evaluation_sets(size), (None, beam))
    for name, label in (("test", "test recordings"), ("unseen", "unseen speaker")):
        print(
            f"{label}: WER {results[f'{name}_wer_greedy']:.2f} % greedy, "
            f"{results[f'{name}_wer_beam{beam}']:.2f} % beam {beam} ({size} utterances)"
        )
