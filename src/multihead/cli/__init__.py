"""The `multihead` command: demo, train, eval, translate, show.

multihead demo                         the shipped English → French model: scores, pictures
multihead demo layer                   one attention layer, step by step, vs torch's
multihead train translate|image|speech [options]    (options: multihead train TASK --help)
multihead eval translate|speech [--model DIR] [--sentences N] [--beam B]
multihead translate "Where is the station?" [--show]   (no sentence: one per stdin line)
multihead show translation "..." | image N | weights.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from .apps.show import add_show_command

TASKS = {
    "translate": "multihead.apps.translate.train",
    "image": "multihead.apps.image",
    "speech": "multihead.apps.speech.train",
}
TRANSLATION_MODEL = Path("models/translate-en-fr")
SPEECH_MODEL = Path("models/speech-digits")


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


def _demo(args: argparse.Namespace) -> int:
    if args.what == "layer":
        from . import layer_demo

        layer_demo.run(embed_dim=args.embed_dim, num_heads=args.num_heads, seed=args.seed)
        return 0
    from .apps.translate import demo

    demo.run(args.model, args.out, test_sentences=args.sentences, beam_size=args.beam)
    return 0


def _train(args: argparse.Namespace) -> int:
    app = importlib.import_module(TASKS[args.task])
    return int(app.main(args.options) or 0)


def _eval(args: argparse.Namespace) -> int:
    if args.task == "speech":
        return _eval_speech(args)
    if args.task != "translate":
        raise UserError(
            f"eval {args.task}: its training command scores the model at the end "
            f"(multihead train {args.task}); eval is for the shipped translation and speech "
            "models"
        )
    from .apps.translate import demo
    from .apps.translate.data import load_splits
    from .apps.translate.evaluate import evaluate_pairs

    model, sp = demo.load(TRANSLATION_MODEL if args.model is None else args.model)
    beam = 5 if args.beam is None else args.beam
    scores, _ = evaluate_pairs(model, sp, load_splits().test, limit=args.sentences, beam_size=beam)
    print(f"test: {scores}")
    return 0


def _eval_speech(args: argparse.Namespace) -> int:
    from .apps.speech.evaluate import evaluation_sets, score
    from .models import SpeechEncoder

    directory = SPEECH_MODEL if args.model is None else args.model
    if not (directory / "config.json").is_file():
        raise UserError(f"no speech model in {directory} (config.json missing)")
    model = SpeechEncoder.from_pretrained(directory)
    size = 300 if args.sentences is None else args.sentences
    beam = 8 if args.beam is None else args.beam
    results = score(model, evaluation_sets(size), (None, beam))
    for name in ("test", "unseen"):
        print(
            f"{name}: WER {results[f'{name}_wer_greedy']:.2f} % greedy, "
            f"{results[f'{name}_wer_beam{beam}']:.2f} % beam {beam} ({size} utterances)"
        )
    return 0


def _translate(args: argparse.Namespace) -> int:
    from .apps.translate import demo
    from .apps.translate.evaluate import translate

    if args.sentence is not None:
        if not args.sentence.strip():
            raise UserError("the sentence is empty: give some English to translate")
        sentences = [args.sentence]
    else:
        sentences = [line.strip() for line in sys.stdin]
    model, sp = demo.load(args.model)
    keep = [i for i, s in enumerate(sentences) if s]
    french = translate(model, sp, [sentences[i] for i in keep], beam_size=args.beam)
    out = [""] * len(sentences)
    for i, f in zip(keep, french, strict=True):
        out[i] = f
    print("\n".join(out))
    if args.show and args.sentence is not None:
        for path in demo.write_heatmaps(model, sp, args.sentence, args.out, beam_size=args.beam):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multihead",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the translation model at work (or: demo layer)")
    demo.add_argument("what", nargs="?", choices=["translation", "layer"], default="translation")
    demo.add_argument("--model", type=Path, default=TRANSLATION_MODEL)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--sentences", type=int, help="score on this many test sentences (all)")
    demo.add_argument("--beam", type=int, default=5)
    demo.add_argument("--embed-dim", type=int, default=32, help="(demo layer)")
    demo.add_argument("--num-heads", type=int, default=4, help="(demo layer)")
    demo.add_argument("--seed", type=int, default=0, help="(demo layer)")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train an application's model", add_help=False)
    train.add_argument("task", choices=sorted(TASKS))
    train.add_argument("options", nargs=argparse.REMAINDER)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="score a trained model on its test set")
    evaluate.add_argument("task", choices=sorted(TASKS))
    evaluate.add_argument("--model", type=Path, help="default: the shipped model of the task")
    evaluate.add_argument(
        "--sentences", type=int, help="this many test sentences (all) / utterances (300)"
    )
    evaluate.add_argument("--beam", type=int, help="beam size (translate 5, speech 8)")
    evaluate.set_defaults(run=_eval)

    translate = commands.add_parser("translate", help="English → French")
    translate.add_argument("sentence", nargs="?", help="omit to read one sentence per line")
    translate.add_argument("--model", type=Path, default=TRANSLATION_MODEL)
    translate.add_argument("--beam", type=int, default=5)
    translate.add_argument("--show", action="store_true", help="write the attention pictures")
    translate.add_argument("--out", type=Path, default=Path("runs/translate"))
    translate.set_defaults(run=_translate)

    add_show_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UserError, ValueError, OSError) as error:
        # What the user asked for cannot be done (a bad value; a missing, unreadable or
        # damaged file; a full disk): one line, no traceback.
        print(f"multihead {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training stopped on a non-finite loss/gradient
        print(f"multihead {args.command}: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"multihead {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
