"""One small training loop for every application: schedules, checkpoints, resume, logs."""

from .average import WeightAverage
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    find_checkpoint,
    has_checkpoint,
    load_checkpoint,
    previous_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .log import MetricsLog, plot_curves, publish_run, read_log
from .loop import TrainConfig, Trainer, TrainResult, seed_everything
from .schedule import (
    inverse_sqrt_factor,
    warmup_cosine,
    warmup_cosine_factor,
    warmup_inverse_sqrt,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "MetricsLog",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WeightAverage",
    "capture_rng",
    "find_checkpoint",
    "has_checkpoint",
    "inverse_sqrt_factor",
    "load_checkpoint",
    "plot_curves",
    "previous_checkpoint",
    "publish_run",
    "read_log",
    "restore_rng",
    "save_checkpoint",
    "seed_everything",
    "warmup_cosine",
    "warmup_cosine_factor",
    "warmup_inverse_sqrt",
]
