"""``multihead bench --quick``: the layer against torch's and the naive formula, on this machine.

About a minute: self-attention with batch 4, d_model 512, 8 heads, fp32, at N = 256 and 1024,
inference and training (forward + backward). The contenders hold the same weights and are
called in turn, round after round, starting one later each round, so a busy neighbour slows
them alike; each figure is the median over rounds of a contender's time divided by
``torch.nn.MultiheadAttention``'s time in the same round. The full benchmarks, with their
JSON and plots, are ``make bench`` in a source checkout (``benchmarks/``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..apps.limits import bounded_int
from ..multi_head_attention import MultiHeadAttention
from .errors import UserError

__all__ = ["add_command", "run_quick"]

BATCH, D_MODEL, HEADS = 4, 512, 8
SIZES = (256, 1024)
MODES = ("inference", "training")
MAX_SIZE = 8192
MIN_ROUNDS = 3


class Naive(nn.Module):
    """The formula written out: softmax(q kᵀ / sqrt(d)) v, the N×N matrix in memory."""

    def __init__(self, source: MultiHeadAttention) -> None:
        super().__init__()
        self.source = source  # the same projections as our layer

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        qkv = self.source.in_proj(x).view(batch, seq, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.source.out_proj((weights @ v).transpose(1, 2).flatten(2))


def contenders() -> tuple[dict[str, Callable[[Tensor], Tensor]], list[nn.Module]]:
    """Ours, torch's and the naive formula with the same weights, first the baseline; and
    the modules, whose train/eval mode picks torch's inference fast path."""
    torch.manual_seed(0)
    ours = MultiHeadAttention(D_MODEL, HEADS)
    theirs = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.in_proj.weight)
        theirs.in_proj_bias.copy_(ours.in_proj.bias)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    naive = Naive(ours)
    runs: dict[str, Callable[[Tensor], Tensor]] = {
        "torch MHA": lambda x: theirs(x, x, x, need_weights=False)[0],
        "multihead": lambda x: ours(x, need_weights=False),
        "naive": naive,
    }
    return runs, [ours, theirs, naive]


def _gigabytes(n: int, mode: str) -> float:
    """Peak memory of the naive formula, the hungriest contender: N×N score buffers."""
    return (4 if mode == "training" else 2) * BATCH * HEADS * n * n * 4 / 1e9 + 0.5


def _available_gigabytes() -> float | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def _timer(run: Callable[[Tensor], Tensor], x: Tensor, mode: str) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        if mode == "inference":
            with torch.inference_mode():
                run(x)
        else:
            x.grad = None
            run(x).sum().backward()
        return time.perf_counter() - start

    return once


def measure(
    runs: dict[str, Callable[[Tensor], Tensor]], n: int, mode: str, seconds: float
) -> dict[str, tuple[float, float]]:
    """Each contender's (paired ratio to the first, the first's median seconds) at N = n,
    from as many rounds (at least three) as ``seconds`` allow, warm-up included."""
    deadline = time.monotonic() + seconds
    x = torch.randn(BATCH, n, D_MODEL, requires_grad=mode == "training")
    timers = {name: _timer(run, x, mode) for name, run in runs.items()}
    for timer in timers.values():
        timer()  # warm-up
    names = list(timers)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0
    while rounds < MIN_ROUNDS or time.monotonic() < deadline:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timers[name]())
        rounds += 1
    base = times[names[0]]
    return {
        name: (statistics.median(t / b for t, b in zip(times[name], base, strict=True)),
               statistics.median(base))
        for name in names
    }  # fmt: skip


def run_quick(sizes: tuple[int, ...], seconds: float, threads: int) -> list[str]:
    """Print the ratio table row by row (and return its lines), after checking that the
    contenders compute the same function."""
    torch.set_num_threads(threads)
    runs, modules = contenders()
    probe = torch.randn(2, 64, D_MODEL)
    with torch.inference_mode():
        outputs = [run(probe) for run in runs.values()]
    worst = max(float((out - outputs[0]).abs().max()) for out in outputs)
    if worst > 1e-4:
        raise RuntimeError(f"the contenders disagree by {worst:.1e}: the table would mislead")
    end, left = time.monotonic() + seconds, len(sizes) * len(MODES)
    base, *others = runs
    plural = "s" if threads != 1 else ""
    lines = [
        f"batch {BATCH}, d_model {D_MODEL}, {HEADS} heads, float32, {threads} thread{plural}: "
        f"time / {base}'s time in the same round (median; below 1 is faster)",
        f"{'mode':<10} {'N':>6} {base + ' ms':>13} " + " ".join(f"{n:>10}" for n in others),
    ]
    print("\n".join(lines), flush=True)
    for mode in MODES:
        for module in modules:
            module.train(mode == "training")  # dropout is 0: only the fast paths differ
        for n in sizes:
            share = max(0.0, end - time.monotonic()) / left  # the warm-ups count too
            left -= 1
            result = measure(runs, n, mode, share)
            cells = " ".join(f"{result[name][0]:>10.2f}" for name in others)
            lines.append(f"{mode:<10} {n:>6} {1e3 * result[base][1]:>13.2f} {cells}")
            print(lines[-1], flush=True)
    return lines


def add_command(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="a one-minute layer benchmark on this machine (--quick)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--quick", action="store_true", help="the one-minute run (required)")
    bench.add_argument(
        "--sizes",
        nargs="+",
        type=bounded_int(1, MAX_SIZE, f"sequence lengths are at most {MAX_SIZE}"),
        default=list(SIZES),
        help="sequence lengths",
    )
    bench.add_argument(
        "--seconds",
        type=bounded_int(1, 3600, "at most an hour"),
        default=60,
        help="time budget, shared by the sizes and modes",
    )
    bench.add_argument(
        "--threads",
        type=bounded_int(1, 1024, "torch threads"),
        default=torch.get_num_threads(),
        help="torch threads (default: torch's)",
    )
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.quick:
        raise UserError(
            "only the quick run is built in: multihead bench --quick "
            "(the full benchmarks are `make bench` in a source checkout)"
        )
    available = _available_gigabytes()
    for n in args.sizes:
        needed = max(_gigabytes(n, mode) for mode in MODES)
        if available is not None and needed > available:
            raise UserError(
                f"N = {n} needs about {needed:.1f} GB for the naive formula's N×N scores, "
                f"more than the {available:.1f} GB available: use smaller --sizes"
            )
    run_quick(tuple(args.sizes), float(args.seconds), args.threads)
    return 0
