"""Learning-rate schedules: linear warmup, then cosine decay or inverse square root.

Warmup matters for Transformers: Adam's second-moment estimates are noise for the first
few hundred updates, and a full learning rate then can wreck the attention layers. Each
factory returns a `torch.optim.lr_scheduler.LambdaLR`; the pure ``*_factor`` functions give
the multiplier of the base learning rate for the update with index ``step`` (0-based), so the
numbers can be checked by hand.

The `Trainer` builds its scheduler from a factory that it hands its own progress, so a
decay can follow a time budget without the schedule knowing about the trainer:

    Trainer(..., schedule=lambda opt, progress: warmup_cosine(opt, 400, progress=progress))
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "inverse_sqrt_factor",
    "warmup_cosine",
    "warmup_cosine_factor",
    "warmup_inverse_sqrt",
]


def _check_steps(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _warmup(n: int, warmup_steps: int) -> float:
    # n counts updates from 1, so the first update already has a non-zero learning rate.
    return n / warmup_steps


def warmup_cosine_factor(
    step: int, warmup_steps: int, progress: float, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier for update ``step``: linear warmup, then cosine from 1 to ``min_lr_ratio``.

    ``progress`` is the fraction of the decay phase done (0 → 1); it is clipped to [0, 1].
    """
    n = step + 1
    if n < warmup_steps:
        return _warmup(n, warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """Multiplier for update ``step``: linear warmup to 1, then sqrt(warmup / n) (Vaswani 2017)."""
    n = step + 1
    return min(_warmup(n, warmup_steps), math.sqrt(warmup_steps / n))


def warmup_cosine(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    *,
    progress: Callable[[], float] | None = None,
) -> LambdaLR:
    """Linear warmup for ``warmup_steps`` updates, then cosine decay to ``min_lr_ratio``.

    The decay ends at update ``total_steps``. When the length of the run is known only as a
    time budget, pass ``progress`` instead: a callable giving the fraction of the run done
    (the one the `Trainer` hands its schedule factory), and the cosine ends with the run.
    """
    _check_steps("warmup_steps", warmup_steps, 0)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if (total_steps is None) == (progress is None):
        raise ValueError("warmup_cosine needs exactly one of total_steps or progress")
    if total_steps is not None:
        _check_steps("total_steps", total_steps, max(warmup_steps, 1))
        decay_steps = max(total_steps - warmup_steps, 1)

        def by_step(step: int) -> float:
            done = (step + 1 - warmup_steps) / decay_steps
            return warmup_cosine_factor(step, warmup_steps, done, min_lr_ratio)

        return LambdaLR(optimizer, by_step)

    assert progress is not None
    progress_fn = progress

    def by_progress(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, progress_fn(), min_lr_ratio)

    return LambdaLR(optimizer, by_progress)


def warmup_inverse_sqrt(optimizer: Optimizer, warmup_steps: int) -> LambdaLR:
    """Linear warmup to the base learning rate, then decay as 1/sqrt(step); needs no run length."""
    _check_steps("warmup_steps", warmup_steps, 1)
    return LambdaLR(optimizer, lambda step: inverse_sqrt_factor(step, warmup_steps))
