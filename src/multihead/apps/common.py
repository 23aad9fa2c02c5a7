"""The skeleton the three training entry points share: flags, start, trainer, results.

Image, speech and translation differ in their data, model and loss; how a run is bounded,
resumed, seeded, optimised and recorded is the same, so it is written once here and a flag
such as ``--minutes``, ``--resume`` or ``--lr`` means the same in every app. An app states
its `Defaults` and its own flags, and hands its model, loss and batches to `build_trainer`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..training import (
    TrainConfig,
    Trainer,
    WeightAverage,
    has_checkpoint,
    publish_run,
    warmup_cosine,
    warmup_inverse_sqrt,
)
from ..training import distributed as dist
from ..training.loop import BatchFactory, EvalFn, LossFn

__all__ = [
    "Defaults",
    "build_parser",
    "build_trainer",
    "parse_args",
    "record",
    "schedule",
    "start",
    "weight_average",
    "write_results",
]

Schedule = Callable[[Optimizer, Callable[[], float]], LRScheduler]


@dataclass(frozen=True)
class Defaults:
    """One app's defaults for the shared flags (its recipe's numbers)."""

    run_dir: str
    model_dir: str | None  # None: the app saves its model inside the run (no --model-dir)
    minutes: float | None  # None: no time budget unless asked (or ``unbounded_minutes``)
    threads: int
    lr: float
    warmup: int
    eval_every: int
    d_model: int
    heads: int
    ff: int
    dropout: float
    weight_decay: float = 0.01
    average_fraction: float | None = None  # None: the app averages no weights (no flags)
    average_every: int = 50
    unbounded_minutes: float | None = None  # the budget of a run given no limit at all


def build_parser(prog: str, description: str, defaults: Defaults) -> argparse.ArgumentParser:
    """A parser holding the shared flags with ``defaults``; the app adds its own to it."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--run-dir",
        type=Path,
        default=Path(defaults.run_dir),
        help="log, curves, checkpoints, metrics",
    )
    if defaults.model_dir is not None:
        run.add_argument(
            "--model-dir",
            type=Path,
            default=Path(defaults.model_dir),
            help="where the final model is saved",
        )
    budget = "training time budget"
    if defaults.unbounded_minutes is not None:
        budget += f" ({defaults.unbounded_minutes:g} if no other limit is given)"
    run.add_argument("--minutes", type=float, default=defaults.minutes, help=budget)
    run.add_argument("--epochs", type=int, help="stop after this many epochs (also)")
    run.add_argument(
        "--steps", "--max-steps", dest="steps", type=int, help="stop after this many updates (also)"
    )
    run.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="updates between evaluations",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of initialisation, data order, augmentation and dropout",
    )
    run.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    run.add_argument("--overwrite", action="store_true", help="restart the run in --run-dir")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    model = parser.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=defaults.d_model, help="model width")
    model.add_argument("--heads", type=int, default=defaults.heads, help="attention heads")
    model.add_argument(
        "--ff", "--ffn", dest="ff", type=int, default=defaults.ff, help="feed-forward width"
    )
    model.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout rate")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    optim.add_argument("--warmup", type=int, default=defaults.warmup, help="warmup updates")
    optim.add_argument(
        "--schedule",
        choices=["cosine", "inverse-sqrt"],
        default="cosine",
        help="after warmup: cosine to 0 at the end of the run, or 1/sqrt(step)",
    )
    optim.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW, matrices only"
    )
    optim.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    if defaults.average_fraction is not None:
        optim.add_argument(
            "--average-fraction",
            type=float,
            default=defaults.average_fraction,
            help="average the weights over this last share of the run (0: off)",
        )
        optim.add_argument(
            "--average-every",
            type=int,
            default=defaults.average_every,
            help="updates between averaged samples",
        )
    return parser


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, defaults: Defaults
) -> argparse.Namespace:
    """The flags, refused before any work when ``--run-dir`` holds a run that neither
    ``--resume`` nor ``--overwrite`` says what to do with. A run given no limit at all gets
    the app's ``unbounded_minutes``."""
    args = parser.parse_args(argv)
    if args.minutes is None and args.epochs is None and args.steps is None:
        args.minutes = defaults.unbounded_minutes
    if has_checkpoint(args.run_dir / "last") and not (args.resume or args.overwrite):
        parser.error(f"{args.run_dir} already holds a run: pass --resume or --overwrite")
    return args


def start(args: argparse.Namespace) -> bool:
    """Join the other processes (under torchrun) and set the threads; True on the process
    that evaluates and writes files."""
    dist.setup()
    torch.set_num_threads(args.threads)
    return dist.is_main()


def schedule(args: argparse.Namespace) -> Schedule:
    """The learning-rate schedule the flags ask for; the cosine ends with the run, by the
    progress the trainer hands it (steps, epochs or minutes, whichever ends first)."""
    if args.schedule == "inverse-sqrt":
        return lambda optimizer, progress: warmup_inverse_sqrt(optimizer, args.warmup)
    return lambda optimizer, progress: warmup_cosine(optimizer, args.warmup, progress=progress)


def weight_average(model: nn.Module, args: argparse.Namespace) -> WeightAverage:
    """Averages ``model``'s weights over the last ``--average-fraction`` of the run."""
    return WeightAverage(model, args.average_every, 1.0 - args.average_fraction)


def build_trainer(
    args: argparse.Namespace,
    model: nn.Module,
    loss_fn: LossFn,
    batches: BatchFactory,
    *,
    evaluate: EvalFn,
    log_every: int,
    checkpoint_every: int | None = None,
    rate_key: str | None = None,
    best_metric: str | None = None,
    best_mode: Literal["min", "max"] = "max",
    average: WeightAverage | None = None,
) -> Trainer:
    """The `Trainer` as the shared flags configure it; the keywords are the app's own
    (``checkpoint_every`` defaults to ``--eval-every``). ``average`` collects weights on the
    main process while ``--average-fraction`` is above 0."""
    config = TrainConfig(
        run_dir=args.run_dir,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.clip,
        seed=args.seed,
        max_steps=args.steps,
        max_epochs=args.epochs,
        time_budget_minutes=args.minutes,
        log_every=log_every,
        eval_every=args.eval_every,
        checkpoint_every=args.eval_every if checkpoint_every is None else checkpoint_every,
        best_metric=best_metric,
        best_mode=best_mode,
        rate_key=rate_key,
        resume=args.resume,
        overwrite=args.overwrite,
        progress_bar=not args.no_progress,
    )
    averaging = average is not None and args.average_fraction > 0 and dist.is_main()
    return Trainer(
        model,
        loss_fn,
        batches,
        config,
        schedule=schedule(args),
        evaluate=evaluate,
        after_step=average if averaging else None,
    )


def record(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as JSON values, for the results file."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_results(
    args: argparse.Namespace, results: Mapping[str, Any], model_dir: Path | None
) -> None:
    """``metrics.json`` in the run; beside a saved model, the same figures with the training
    log and curves (`publish_run`), so every figure travels with its weights."""
    (args.run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    if model_dir is not None:
        publish_run(args.run_dir, model_dir, results)
