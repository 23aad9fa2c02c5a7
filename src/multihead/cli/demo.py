"""``multihead demo``: the shipped translation model at work, or one layer step by step."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..apps.limits import BEAM, bounded_int
from ..apps.shipped import shipped_model
from .errors import UserError

__all__ = ["add_command"]

MAX_LAYER_WIDTH = 4096  # the layer demo prints every head: wider says nothing more


def add_command(commands: Any) -> None:
    demo = commands.add_parser("demo", help="the translation model at work (or: demo layer)")
    demo.add_argument("what", nargs="?", choices=["translation", "layer"], default="translation")
    demo.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="for the pictures")
    demo.add_argument(
        "--sentences",
        type=bounded_int(1, 10**6, "a count of test sentences"),
        help="score on this many test sentences (default: all 2,003)",
    )
    demo.add_argument("--beam", type=BEAM, default=5)
    demo.add_argument("--embed-dim", type=int, default=32, help="(demo layer)")
    demo.add_argument("--num-heads", type=int, default=4, help="(demo layer)")
    demo.add_argument("--seed", type=int, default=0, help="(demo layer)")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.what == "layer":
        from .. import layer_demo

        for flag, value in (("--embed-dim", args.embed_dim), ("--num-heads", args.num_heads)):
            if value > MAX_LAYER_WIDTH:
                raise UserError(f"{flag} must be at most {MAX_LAYER_WIDTH}, got {value}")

        layer_demo.run(embed_dim=args.embed_dim, num_heads=args.num_heads, seed=args.seed)
        return 0
    from ..apps.translate import demo

    model = args.model or shipped_model("translate-en-fr")
    demo.run(model, args.out, test_sentences=args.sentences, beam_size=args.beam)
    return 0
