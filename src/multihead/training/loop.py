"""`Trainer`: one small training loop for every application.

The application brings the model, a loss function (batch → loss, metrics) and a factory of
training batches per epoch; the trainer brings AdamW, the learning-rate schedule, gradient
clipping, the stopping rule (steps, epochs or minutes), periodic evaluation, the JSONL log,
checkpoints, the progress bar and the plot.

Resuming gives the same numbers as never stopping: the checkpoint holds the optimizer,
scheduler and RNG states and the position in the data, and the batch factory is asked for
the same epoch again and fast-forwarded. For that to hold, ``batches(epoch)`` must be a
deterministic function of ``epoch`` that does not draw from the global RNGs (give it its own
``torch.Generator`` seeded from the epoch), and ``evaluate`` must not draw from them either.

A non-finite loss or gradient never reaches the weights: with ``on_nonfinite="stop"`` (the
default) training stops with a `FloatingPointError` naming the step and the loss or the
parameter whose gradient it was; with ``"skip"`` the batch is dropped without an update (the
step counter does not advance) and a ``nonfinite`` record goes to the log.

Under ``torchrun`` (see `distributed`) every process runs this loop on its rows of each
global batch: ``model`` is the `distributed.wrap` wrapper that ``loss_fn`` calls, and the
loss is weighted with `distributed.mean_share`, so the averaged gradient is the global
batch's. The processes take every decision together: each step one all-reduce carries the
loss (non-finite anywhere: every process skips or stops), the metrics and rank 0's clock,
which alone drives time budgets and schedules. Rank 0 alone evaluates and writes the log,
checkpoints and plot. A checkpoint holds the global position (step, epoch, batches of the
epoch), so a run resumes with any number of processes; it holds rank 0's RNG states, and the
other ranks reseed from (seed, rank, step), so with dropout a resumed multi-process run is
reproducible but not bitwise the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import find_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .log import MetricsLog, plot_curves

__all__ = ["TrainConfig", "TrainResult", "Trainer", "seed_everything"]

LossFn = Callable[[Any], tuple[Tensor, Mapping[str, float | Tensor]]]
BatchFactory = Callable[[int], Iterable[Any]]
EvalFn = Callable[[nn.Module, int], Mapping[str, float]]
# (optimizer, progress) → scheduler; progress() is the fraction of the run done (0 → 1).
ScheduleFactory = Callable[[Optimizer, Callable[[], float]], LRScheduler]
_END = object()
# With on_nonfinite="skip", this many non-finite steps in a row stop the run anyway.
MAX_SKIPS_IN_A_ROW = 20


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank > 0 at ``step``: distinct per rank, reproducible on resume."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def _positive(name: str, value: object, kind: type = int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, kind | int):
        raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    if not value > 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass
class TrainConfig:
    """How to train; every run writes it to ``run_dir/train_config.json``."""

    run_dir: str | Path = "runs/run"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    seed: int = 0
    max_steps: int | None = None
    max_epochs: int | None = None
    time_budget_minutes: float | None = None
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "max"
    rate_key: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress_bar: bool = True
    plot: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        _positive("lr", self.lr, float, allow_none=False)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        _positive("grad_clip", self.grad_clip, float)
        _positive("max_steps", self.max_steps)
        _positive("max_epochs", self.max_epochs)
        _positive("time_budget_minutes", self.time_budget_minutes, float)
        _positive("log_every", self.log_every, allow_none=False)
        _positive("eval_every", self.eval_every)
        _positive("checkpoint_every", self.checkpoint_every)
        if self.max_steps is None and self.max_epochs is None and self.time_budget_minutes is None:
            raise ValueError("give at least one of max_steps, max_epochs, time_budget_minutes")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")


@dataclass
class TrainResult:
    """Where a run ended."""

    step: int
    epoch: int
    elapsed_seconds: float
    final_loss: float | None
    best: float | None
    run_dir: Path


@dataclass
class _Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, seconds: float, values: Mapping[str, float]) -> None:
        self.steps += 1
        self.seconds += seconds
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def reset(self) -> None:
        self.steps, self.seconds, self.sums = 0, 0.0, {}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: shrinking biases and norm gains towards 0 only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _format_seconds(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Train ``model`` by minimising ``loss_fn`` over ``batches(epoch)``; see the module doc.

    Args:
        model: the module whose parameters AdamW updates and whose weights are checkpointed;
            under torchrun its `distributed.wrap` wrapper, which ``loss_fn`` must call.
        loss_fn: batch → (scalar loss tensor, metrics such as {"tokens": 812, "acc": 0.4}).
        batches: epoch → iterable of batches, deterministic in epoch.
        config: `TrainConfig`.
        schedule: (optimizer, progress) → LR scheduler stepped once per update (see
            `schedule.py`); default constant learning rate. ``progress`` is this trainer's
            `progress`, so a decay can end with the run when only a time budget bounds it.
        evaluate: (model, step) → metrics, called in eval mode without gradients every
            ``eval_every`` steps and at the end.
        after_step: called with the trainer after every update (and its log, eval and
            checkpoint), e.g. to collect weights for averaging.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: BatchFactory,
        config: TrainConfig,
        *,
        schedule: ScheduleFactory | None = None,
        evaluate: EvalFn | None = None,
        after_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        for name, function in (("loss_fn", loss_fn), ("batches", batches)):
            if not callable(function):
                raise TypeError(f"{name} must be callable, got {type(function).__name__}")
        if config.best_metric is not None and evaluate is None:
            raise ValueError("best_metric needs an evaluate callback")
        self.world = distributed.world_size()
        self.rank = distributed.rank()
        self.main = self.rank == 0  # the one process that evaluates and writes files
        self.model = distributed.unwrap(model)
        self._forwards = 0  # calls of the DDP wrapper: loss_fn must go through it
        if distributed.launched() and self.world == 1:
            raise ValueError(
                "torchrun started several processes but they have not joined: call "
                "multihead.training.distributed.setup() before building the model"
            )
        if self.world > 1:
            if self.model is model:
                raise ValueError(
                    f"{self.world} processes train together but model is not wrapped: pass "
                    "multihead.training.distributed.wrap(model) and call that in loss_fn, so "
                    "DistributedDataParallel averages the gradients"
                )
            model.register_forward_pre_hook(self._count_forward)
        model = self.model
        self.loss_fn = loss_fn
        self.batches = batches
        self.config = config
        self.evaluate = evaluate
        self.after_step = after_step
        self.run_dir = Path(config.run_dir)
        self.log = MetricsLog(self.run_dir / "log.jsonl")
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.best: float | None = None
        self._epoch_len: int | None = None
        self._elapsed_before = 0.0
        self._session_start: float | None = None
        self._agreed_session = 0.0  # rank 0's session clock at the last step (world > 1)
        self._last_eval_step = -1
        self._last_checkpoint_step = -1
        self._last_loss: float | None = None
        self.skipped = 0  # steps dropped for a non-finite loss or gradient (this session)
        self._skips_in_a_row = 0
        self._names = {id(p): name for name, p in model.named_parameters()}
        self.optimizer = AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
        )
        if schedule is None:
            self.scheduler: LRScheduler = LambdaLR(self.optimizer, lambda step: 1.0)
        else:
            self.scheduler = schedule(self.optimizer, self.progress)
            if not isinstance(self.scheduler, LRScheduler):
                raise TypeError(
                    f"schedule must return an LRScheduler, got {type(self.scheduler).__name__}"
                )

    # -- where the run stands ------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds of training so far, over all sessions of this run."""
        if self._session_start is None:
            return self._elapsed_before
        if self.world > 1:  # every process must stop, and schedule, by the same clock
            return self._elapsed_before + self._agreed_session
        return self._elapsed_before + time.monotonic() - self._session_start

    def progress(self) -> float:
        """Fraction of the run done (0 → 1), by whichever limit is closest."""
        config = self.config
        fractions = [0.0]
        if config.max_steps is not None:
            fractions.append(self.step / config.max_steps)
        if config.time_budget_minutes is not None:
            fractions.append(self.elapsed() / (60.0 * config.time_budget_minutes))
        if config.max_epochs is not None:
            done = self.epoch + (self.position / self._epoch_len if self._epoch_len else 0.0)
            fractions.append(done / config.max_epochs)
        return min(max(fractions), 1.0)

    def _done(self) -> bool:
        config = self.config
        return (
            (config.max_steps is not None and self.step >= config.max_steps)
            or (config.max_epochs is not None and self.epoch >= config.max_epochs)
            or (
                config.time_budget_minutes is not None
                and self.elapsed() >= 60.0 * config.time_budget_minutes
            )
        )

    def _eta(self, seconds_per_step: float) -> float:
        config = self.config
        left = [math.inf]
        if config.max_steps is not None:
            left.append((config.max_steps - self.step) * seconds_per_step)
        if config.time_budget_minutes is not None:
            left.append(60.0 * config.time_budget_minutes - self.elapsed())
        if config.max_epochs is not None and self._epoch_len:
            total = config.max_epochs * self._epoch_len
            left.append((total - self.epoch * self._epoch_len - self.position) * seconds_per_step)
        return min(left)

    def _total_steps_hint(self) -> int | None:
        config = self.config
        if config.max_steps is not None:
            return config.max_steps
        if config.max_epochs is not None:
            batches = self.batches(0)
            if hasattr(batches, "__len__"):
                self._epoch_len = len(batches)  # type: ignore[arg-type]
                return config.max_epochs * self._epoch_len
        return None

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run until a limit is reached; return where it ended."""
        config = self.config
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        pending_rng = self._start()
        if self.main:
            (self.run_dir / "train_config.json").write_text(
                json.dumps(asdict(config), default=str, indent=2) + "\n", encoding="utf-8"
            )
        self._session_start = time.monotonic()
        bar = tqdm(
            total=self._total_steps_hint(),
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (config.progress_bar and self.main),
        )
        window = _Window()
        try:
            while not self._done():
                iterator = iter(self.batches(self.epoch))
                for _ in range(self.position):
                    if next(iterator, _END) is _END:
                        raise ValueError(
                            f"batches({self.epoch}) yields fewer than the {self.position} "
                            "batches the checkpoint has already consumed: is it deterministic?"
                        )
                if pending_rng is not None:
                    restore_rng(pending_rng)
                    pending_rng = None
                exhausted = True
                tick = time.monotonic()
                for batch in iterator:
                    if not self._train_step(batch, window, tick):  # skipped: no update
                        tick = time.monotonic()
                        continue
                    bar.update(1)
                    self._periodic(window, bar)
                    if self.after_step is not None:
                        self.after_step(self)
                    tick = time.monotonic()
                    if self._done():
                        exhausted = False
                        break
                if exhausted:
                    if self.position == 0:
                        raise ValueError(f"batches({self.epoch}) yielded no batches")
                    self._epoch_len = self.position
                    self.epoch += 1
                    self.position = 0
            if self.evaluate is not None and self._last_eval_step != self.step:
                self._run_eval(bar)
            if self._last_checkpoint_step != self.step:
                self._save(self.run_dir / "last")
            distributed.barrier()  # when train() returns anywhere, the checkpoint is on disk
        finally:
            bar.close()
        if config.plot and self.main:
            plot_curves(self.log.path, self.run_dir / "curves.png")
        return TrainResult(
            step=self.step,
            epoch=self.epoch,
            elapsed_seconds=self.elapsed(),
            final_loss=self._last_loss,
            best=self.best,
            run_dir=self.run_dir,
        )

    def _start(self) -> dict[str, Any] | None:
        """Load the last checkpoint (resume) or seed a fresh run; return RNG state to restore."""
        config = self.config
        last = self.run_dir / "last"
        found = find_checkpoint(last)
        if config.resume and found is not None:
            if found != last:
                print(f"{last} is missing (interrupted while saving); resuming from {found}")
            checkpoint = load_checkpoint(found, self.model, self.optimizer, self.scheduler)
            self.step, self.epoch, self.position = (
                checkpoint.step,
                checkpoint.epoch,
                checkpoint.position,
            )
            self.best = checkpoint.extra.get("best")
            self._elapsed_before = float(checkpoint.extra.get("elapsed", 0.0))
            self._epoch_len = checkpoint.extra.get("epoch_len")
            self._last_eval_step = int(checkpoint.extra.get("last_eval_step", -1))
            self._last_checkpoint_step = self.step
            if self.main:
                self.log.reset(keep_until_step=self.step)
            return self._agree_on_start(checkpoint.rng)
        if found is not None and not config.resume and not config.overwrite:
            raise ValueError(
                f"{self.run_dir} already holds a checkpoint: pass resume=True to continue it "
                "or overwrite=True to start over"
            )
        if config.resume and self.main:
            print(f"no checkpoint in {last}; starting a fresh run")
        seed_everything(config.seed)
        if self.main:
            self.log.reset()
        return self._agree_on_start(None)

    def _agree_on_start(self, rng: dict[str, Any] | None) -> dict[str, Any] | None:
        """Check that every process starts at the same step; reseed ranks > 0 (rank 0 keeps
        the checkpoint's RNG states, which are returned to be restored)."""
        if self.world == 1:
            return rng
        if not distributed.all_equal(self.step):
            raise ValueError(
                f"the processes start from different steps (rank {self.rank}: {self.step}): "
                f"each must see the same checkpoint in {self.run_dir}, e.g. on a shared disk"
            )
        if self.rank == 0:
            return rng
        seed_everything(_rank_seed(self.config.seed, self.rank, self.step))
        return None

    def _count_forward(self, module: nn.Module, inputs: Any) -> None:
        self._forwards += 1

    def _agree_on_loss(
        self, loss: Tensor, metrics: dict[str, float]
    ) -> tuple[bool, float, dict[str, float], str]:
        """(finite everywhere, the loss, the metrics, what was non-finite): in a single process
        this process's; with several, their mean over processes (the global batch's loss, by
        `distributed.mean_share`), the rate key summed, in one all-reduce with rank 0's clock."""
        local = loss.item()
        if self.world == 1:
            return math.isfinite(local), local, metrics, f"the loss is {local}"
        finite = math.isfinite(local)
        started = self._session_start
        clock = time.monotonic() - started if self.main and started is not None else 0.0
        packed = torch.tensor(
            [0.0 if finite else 1.0, local if finite else 0.0, clock, *metrics.values()],
            dtype=torch.float64,
        )
        distributed.sum_all(packed)
        bad, total, self._agreed_session, *sums = packed.tolist()
        reduced = {
            key: value if key == self.config.rate_key else value / self.world
            for key, value in zip(metrics, sums, strict=True)
        }
        what = f"the loss is non-finite in {int(bad)} of {self.world} processes (rank "
        what += f"{self.rank}'s: {local})"
        return bad == 0, total / self.world, reduced, what

    def _train_step(self, batch: Any, window: _Window, tick: float) -> bool:
        """One update on ``batch``; False if it was skipped for a non-finite value."""
        self.model.train()
        forwards = self._forwards
        loss, metrics = self.loss_fn(batch)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise TypeError("loss_fn must return a scalar loss tensor first")
        if self.world > 1 and self._forwards == forwards:
            raise ValueError(
                "loss_fn did not call the DistributedDataParallel wrapper passed as model: "
                "without it the processes' gradients are not averaged"
            )
        self.optimizer.zero_grad(set_to_none=True)
        numbers = {k: v.item() if isinstance(v, Tensor) else float(v) for k, v in metrics.items()}
        finite, loss_value, numbers, what = self._agree_on_loss(loss, numbers)
        if not finite:
            self._nonfinite(what)
            return False
        # Every process now holds the same averaged gradients, so the checks below, and the
        # decisions they take, agree without another exchange.
        loss.backward()
        values = {"loss": loss_value, "lr": self.optimizer.param_groups[0]["lr"]}
        with_grad = [p for group in self.optimizer.param_groups for p in group["params"]]
        with_grad = [p for p in with_grad if p.grad is not None]
        grads = [p.grad for p in with_grad]
        # Each gradient's norm, then the total: finite exactly when every gradient is.
        norms = [torch.linalg.vector_norm(g) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if not torch.isfinite(norm):
            what = f"the gradient norm is {norm.item()} (overflow)"
            for param, grad, one in zip(with_grad, grads, norms, strict=True):
                if not torch.isfinite(one):
                    kind = "holds NaN" if bool(grad.isnan().any()) else "holds inf"
                    if bool(grad.isfinite().all()):
                        kind = "has a norm that overflows"
                    name = self._names.get(id(param), "an unnamed parameter")
                    what = f"the gradient of {name} {kind} (the loss was {values['loss']})"
                    break
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(what)
            return False
        if self.config.grad_clip is not None:  # as clip_grad_norm_, with the norm at hand
            coef = torch.clamp(self.config.grad_clip / (norm + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(coef.to(grad.device))
            values["grad_norm"] = norm.item()
        self._skips_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.position += 1
        values.update(numbers)
        self._last_loss = values["loss"]
        window.add(time.monotonic() - tick, values)
        return True

    def _nonfinite(self, what: str) -> None:
        """Stop, or drop this batch without an update, as ``on_nonfinite`` says."""
        where = (
            f"at step {self.step + 1} (epoch {self.epoch}, batch {self.position + 1} of the epoch)"
        )
        if self.config.on_nonfinite == "stop":
            raise FloatingPointError(
                f"{what} {where}; training stopped before the update, the weights are intact "
                f"(last checkpoint: {self.run_dir / 'last'}); on_nonfinite='skip' skips such "
                "steps instead"
            )
        self.skipped += 1
        self._skips_in_a_row += 1
        self.position += 1  # the batch is consumed; no update, so the step stays
        if self.main:
            self.log.write("nonfinite", self.step, {"epoch": self.epoch, "what": what})
        if self._skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise FloatingPointError(
                f"{what} {where}: {MAX_SKIPS_IN_A_ROW} steps in a row were non-finite and "
                "skipped, training stopped"
            )

    def _periodic(self, window: _Window, bar: Any) -> None:
        config = self.config
        if not self.main:  # the others go on; they wait for rank 0 at the next step
            return
        if self.step % config.log_every == 0 and window.steps:
            record = {key: total / window.steps for key, total in window.sums.items()}
            rate_name = f"{config.rate_key}_per_s" if config.rate_key else "steps_per_s"
            count = window.sums.get(config.rate_key, 0.0) if config.rate_key else window.steps
            rate = count / max(window.seconds, 1e-9)
            record.update(epoch=self.epoch, elapsed=round(self.elapsed(), 3))
            record[rate_name] = rate
            self.log.write("train", self.step, record)
            eta = self._eta(window.seconds / window.steps)
            short = (config.rate_key or "step") + "/s"
            bar.set_postfix(
                {
                    "loss": f"{record['loss']:.4f}",
                    short: f"{rate:.0f}" if rate >= 100 else f"{rate:.2f}",
                    "eta": _format_seconds(eta) if math.isfinite(eta) else "?",
                },
                refresh=False,
            )
            window.reset()
        if config.eval_every is not None and self.step % config.eval_every == 0:
            self._run_eval(bar)
        if config.checkpoint_every is not None and self.step % config.checkpoint_every == 0:
            self._save(self.run_dir / "last")

    def _run_eval(self, bar: Any) -> None:
        assert self.evaluate is not None
        if not self.main:
            return
        self.model.eval()
        with torch.no_grad():
            results = {
                key: float(value) for key, value in self.evaluate(self.model, self.step).items()
            }
        self.model.train()
        self._last_eval_step = self.step
        self.log.write(
            "eval", self.step, {"epoch": self.epoch, **results, "elapsed": round(self.elapsed(), 3)}
        )
        bar.write(
            f"step {self.step}: "
            + ", ".join(f"{key} {value:.4g}" for key, value in results.items())
        )
        key = self.config.best_metric
        if key is None:
            return
        if key not in results:
            raise KeyError(f"evaluate returned {sorted(results)}, without best_metric {key!r}")
        value = results[key]
        better = self.best is None or (
            value > self.best if self.config.best_mode == "max" else value < self.best
        )
        if better:
            self.best = value
            self._save(self.run_dir / "best")

    def _save(self, directory: Path) -> None:
        if not self.main:
            return
        save_checkpoint(
            directory,
            self.model,
            self.optimizer,
            self.scheduler,
            step=self.step,
            epoch=self.epoch,
            position=self.position,
            extra={
                "best": self.best,
                "elapsed": self.elapsed(),
                "epoch_len": self._epoch_len,
                "last_eval_step": self._last_eval_step,
            },
        )
        if directory.name == "last":
            self._last_checkpoint_step = self.step
