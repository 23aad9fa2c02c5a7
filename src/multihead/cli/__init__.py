"""The `multihead` command: demo, train, eval, translate, show, explain, bench.

multihead demo [layer]                 the shipped English → French model: scores, pictures
multihead train TASK [options]         TASK: translate, image, speech (multihead train TASK -h)
multihead eval translate|image|speech  the shipped model on its fixed test split
multihead translate "Where is the station?" [--show]   (no sentence: one per stdin line)
multihead show translation "..." | image N | weights.safetensors
multihead explain --q-len 4096 --mask causal    the kernel attention picks, and its work
multihead bench --quick                the layer against torch's, on this machine (~1 minute)

The shipped models are found wherever the command runs (`multihead.apps.shipped`); --model
DIR or $MULTIHEAD_MODELS point elsewhere. A mistake in what was asked is reported in one line
with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..apps.show import add_show_command
from . import bench, demo, evaluate, explain, train, translate
from .errors import UserError

__all__ = ["UserError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multihead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"multihead {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_command(commands)
    train.add_command(commands)
    evaluate.add_command(commands)
    translate.add_command(commands)
    add_show_command(commands)
    explain.add_command(commands)
    bench.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UserError, ValueError, OSError) as error:
        # What the user asked for cannot be done (a bad value; a missing, unreadable or
        # damaged file; a full disk): one line, no traceback.
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"multihead {args.command}: error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training stopped on a non-finite loss/gradient
        print(f"multihead {args.command}: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"multihead {args.command}: interrupted", file=sys.stderr)
        return 130
