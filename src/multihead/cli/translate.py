"""``multihead translate``: English → French, one sentence or one per line of standard input.

Standard input is read as bytes and decoded line by line: a line that is not UTF-8 is reported
on standard error with its number, its output line is left empty (so output lines still match
input lines), the other lines are translated, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..apps.limits import BEAM, decode_batch
from ..apps.shipped import shipped_model
from .errors import UserError

__all__ = ["add_command", "read_lines"]


def add_command(commands: Any) -> None:
    translate = commands.add_parser("translate", help="English → French")
    translate.add_argument("sentence", nargs="?", help="omit to read one sentence per line")
    translate.add_argument("--model", type=Path, help="model directory (default: the shipped one)")
    translate.add_argument("--beam", type=BEAM, default=5, help="beam width")
    translate.add_argument("--show", action="store_true", help="write the attention pictures")
    translate.add_argument("--out", type=Path, default=Path("runs/translate"))
    translate.set_defaults(run=run)


def read_lines(data: bytes) -> tuple[list[str], list[int]]:
    """The stripped lines of ``data`` and the 1-based numbers of those that are not UTF-8
    (their text is empty)."""
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()  # the newline that ends the last line
    lines, bad = [], []
    for number, raw in enumerate(pieces, 1):
        try:
            lines.append(raw.decode("utf-8").strip())
        except UnicodeDecodeError as error:
            lines.append("")
            bad.append(number)
            print(
                f"multihead translate: error: line {number} is not UTF-8 (byte "
                f"0x{raw[error.start]:02x} at offset {error.start}): its output line is empty",
                file=sys.stderr,
            )
    return lines, bad


def _sentence(text: str) -> str:
    """The command-line sentence, refused when empty or not valid text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the sentence is not valid UTF-8 text") from None
    if not text.strip():
        raise UserError("the sentence is empty: give some English to translate")
    return text.strip()


def run(args: argparse.Namespace) -> int:
    from ..apps.translate import demo
    from ..apps.translate.evaluate import translate

    sentence = None if args.sentence is None else _sentence(args.sentence)
    if sentence is None and sys.stdin is None:
        raise UserError("no sentence given and no standard input to read")
    model, sp = demo.load(args.model or shipped_model("translate-en-fr"))  # before any input
    bad: list[int] = []
    if sentence is not None:
        sentences = [sentence]
    else:
        stream = getattr(sys.stdin, "buffer", None)
        if stream is not None:
            data = stream.read()
        else:  # a text stream with no bytes beneath (a program that replaced sys.stdin)
            data = sys.stdin.read().encode("utf-8", "surrogatepass")
        sentences, bad = read_lines(data)
    keep = [i for i, s in enumerate(sentences) if s]
    french = translate(
        model, sp, [sentences[i] for i in keep], beam_size=args.beam,
        batch_size=decode_batch(args.beam),
    )  # fmt: skip
    out = [""] * len(sentences)
    for i, f in zip(keep, french, strict=True):
        out[i] = f
    if out:
        print("\n".join(out), flush=True)
    if args.show and sentence is not None:
        for path in demo.write_heatmaps(model, sp, sentence, args.out, beam_size=args.beam):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if bad else 0
