"""The `multihead` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .viz.cli import add_show_command


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


def _demo(args: argparse.Namespace) -> int:
    from . import layer_demo

    layer_demo.run(embed_dim=args.embed_dim, num_heads=args.num_heads, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multihead", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="show an attention layer at work on a sentence")
    demo.add_argument("--embed-dim", type=int, default=32)
    demo.add_argument("--num-heads", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    add_show_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"multihead {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
