"""``multihead train TASK [options]``: one application's training run, under its own flags."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

__all__ = ["TASKS", "add_command", "load_app"]

# task → (module with main(argv, prog=...), what it trains)
TASKS = {
    "translate": ("multihead.apps.translate.train", "English → French Transformer on Tatoeba"),
    "image": ("multihead.apps.image", "ViT on scikit-learn's 8×8 handwritten digits"),
    "speech": ("multihead.apps.speech.train", "speech encoder (CTC) on spoken digit strings"),
}


def add_command(commands: Any) -> None:
    listing = "\n".join(f"  {name:<10} {about}" for name, (_, about) in TASKS.items())
    train = commands.add_parser(
        "train",
        help="train an application's model",
        description=f"Train one application's model.\n\ntasks:\n{listing}\n\n"
        "Each task's flags: multihead train TASK --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("task", choices=list(TASKS), metavar="TASK", help=", ".join(TASKS))
    options = train.add_argument("options", nargs=argparse.REMAINDER, help="the task's flags")
    options.required = False  # a missing TASK is the one thing to report
    train.set_defaults(run=run)


def load_app(task: str) -> Any:
    """The module that trains ``task`` (imported only when asked: each pulls in its data)."""
    return importlib.import_module(TASKS[task][0])


def run(args: argparse.Namespace) -> int:
    app = load_app(args.task)
    return int(app.main(args.options, prog=f"multihead train {args.task}") or 0)
