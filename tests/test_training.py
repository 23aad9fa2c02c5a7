"""The training loop: schedules by hand, checkpoints round-trip, resume equals no interruption."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from multihead.training import (
    TrainConfig,
    Trainer,
    capture_rng,
    load_checkpoint,
    read_log,
    restore_rng,
    save_checkpoint,
    warmup_cosine,
    warmup_cosine_factor,
    warmup_inverse_sqrt,
)

# -- schedules -----------------------------------------------------------------------------


def _lrs(scheduler_factory, steps: int, base_lr: float = 1.0) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = scheduler_factory(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_by_hand() -> None:
    # warmup 4: 1/4, 2/4, 3/4; then cosine over updates 4..10 (6 decay steps) to 0.
    lrs = _lrs(lambda opt: warmup_cosine(opt, warmup_steps=4, total_steps=10), 12, base_lr=2.0)
    expected = [0.5, 1.0, 1.5, 2.0]
    expected += [2.0 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(1, 7)]
    expected += [0.0, 0.0]  # past the end it stays at the floor
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[6] == pytest.approx(1.0)  # half way through the decay: half the peak
    floor = _lrs(lambda opt: warmup_cosine(opt, 0, 4, min_lr_ratio=0.1), 5)
    assert floor[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert floor[3:] == pytest.approx([0.1, 0.1])


def test_warmup_cosine_by_progress() -> None:
    assert warmup_cosine_factor(100, 10, progress=0.5) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 10, progress=2.0) == 0.0
    done = {"fraction": 0.0}
    lrs = _lrs(lambda opt: warmup_cosine(opt, 2, progress=lambda: done["fraction"]), 3)
    assert lrs == pytest.approx([0.5, 1.0, 1.0])
    done["fraction"] = 1.0
    assert _lrs(lambda opt: warmup_cosine(opt, 2, progress=lambda: done["fraction"]), 3)[2] == 0


def test_warmup_inverse_sqrt_by_hand() -> None:
    lrs = _lrs(lambda opt: warmup_inverse_sqrt(opt, warmup_steps=4), 16)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(math.sqrt(4 / 9))  # update 9: sqrt(warmup / n)
    assert lrs[15] == pytest.approx(0.5)  # update 16: sqrt(4 / 16)


def test_schedule_bad_input() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_inverse_sqrt(optimizer, 0)
    with pytest.raises(ValueError, match="exactly one"):
        warmup_cosine(optimizer, 10)
    with pytest.raises(TypeError, match="total_steps"):
        warmup_cosine(optimizer, 10, 100.0)  # type: ignore[arg-type]


# -- checkpoints ---------------------------------------------------------------------------


class TiedMLP(nn.Module):
    """A tiny model with dropout (uses the RNG) and tied weights (shared tensors)."""

    def __init__(self, features: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, features)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(features, 1)
        self.tied = nn.Linear(hidden, features, bias=False)
        self.tied.weight = self.out.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.relu(self.inp(x)))
        return self.head(self.out(h) + self.tied(h)).squeeze(-1)


def _data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)


def _setup(run_dir: Path, schedule_steps: int = 20, schedule=None, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = TiedMLP()
    x, y = _data()

    def batches(epoch: int):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        return [(x[i], y[i]) for i in order.split(8)]

    def loss_fn(batch):
        inputs, targets = batch
        loss = nn.functional.mse_loss(model(inputs), targets)
        return loss, {"items": len(inputs)}

    settings = dict(
        run_dir=run_dir,
        lr=1e-2,
        weight_decay=0.01,
        max_steps=20,
        log_every=2,
        checkpoint_every=5,
        progress_bar=False,
        plot=False,
        rate_key="items",
    )
    settings.update(overrides)
    return Trainer(
        model,
        loss_fn,
        batches,
        TrainConfig(**settings),
        schedule=schedule or (lambda opt, progress: warmup_cosine(opt, 3, schedule_steps)),
    )


def test_trainer_hands_its_progress_to_the_schedule(tmp_path: Path) -> None:
    seen: list[float] = []

    def schedule(optimizer, progress):
        def recorded() -> float:
            seen.append(progress())
            return seen[-1]

        return warmup_cosine(optimizer, 2, progress=recorded)

    trainer = _setup(tmp_path, schedule=schedule, max_steps=8)
    trainer.train()
    # Built at progress 0, then asked after each update (before the step counter moves on),
    # once per parameter group (AdamW's with and without weight decay).
    assert seen == pytest.approx([p for k in [0, *range(8)] for p in (k / 8, k / 8)])
    last = warmup_cosine_factor(8, 2, progress=7 / 8)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * last)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    trainer = _setup(tmp_path / "a", max_steps=6)
    trainer.train()
    x, _ = _data(8, seed=1)
    trainer.model.eval()
    expected = trainer.model(x)
    save_checkpoint(
        tmp_path / "ckpt", trainer.model, trainer.optimizer, trainer.scheduler, step=6, epoch=0
    )

    fresh = _setup(tmp_path / "b", max_steps=6)
    checkpoint = load_checkpoint(tmp_path / "ckpt", fresh.model, fresh.optimizer, fresh.scheduler)
    fresh.model.eval()
    assert checkpoint.step == 6
    assert torch.equal(fresh.model(x), expected)
    assert fresh.model.tied.weight is fresh.model.out.weight  # tying survives the load
    saved, loaded = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(value, loaded["state"][index][key]), key
    assert fresh.scheduler.state_dict() == trainer.scheduler.state_dict()
    # Only tensors and plain values: readable with weights_only=True.
    torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)


def test_rng_round_trip() -> None:
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_inconsistent_checkpoint_is_refused(tmp_path: Path) -> None:
    model = TiedMLP()
    save_checkpoint(tmp_path / "one", model, step=1)
    save_checkpoint(tmp_path / "two", model, step=2)
    (tmp_path / "two" / "state.pt").replace(tmp_path / "one" / "state.pt")
    with pytest.raises(ValueError, match="inconsistent"):
        load_checkpoint(tmp_path / "one", model)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing", model)


# -- the loop ------------------------------------------------------------------------------


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    # 20 steps over 8 batches per epoch: the interruption falls mid-epoch (step 10 of 16).
    straight = _setup(tmp_path / "straight", max_steps=20)
    straight.train()
    rng_after_straight = torch.get_rng_state()

    halves = _setup(tmp_path / "halves", max_steps=20)
    halves.config.max_steps = 10
    halves.train()
    resumed = _setup(tmp_path / "halves", max_steps=20, resume=True)
    result = resumed.train()

    assert result.step == 20 and result.epoch == 2
    expected, got = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert torch.equal(torch.get_rng_state(), rng_after_straight)  # same dropout draws
    deterministic = ("kind", "step", "loss", "lr", "grad_norm", "items", "epoch")
    strip = [{k: r[k] for k in deterministic} for r in read_log(tmp_path / "straight/log.jsonl")]
    assert strip == [
        {k: r[k] for k in deterministic} for r in read_log(tmp_path / "halves/log.jsonl")
    ]


def test_fresh_run_refuses_to_overwrite(tmp_path: Path) -> None:
    _setup(tmp_path, max_steps=2).train()
    with pytest.raises(ValueError, match="resume=True"):
        _setup(tmp_path, max_steps=2).train()
    _setup(tmp_path, max_steps=2, overwrite=True).train()


def test_loss_falls_and_log_has_one_line_per_logged_step(tmp_path: Path) -> None:
    evaluations = []

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        evaluations.append(step)
        x, y = _data(32, seed=2)
        return {"valid_mse": nn.functional.mse_loss(model(x), y).item()}

    trainer = _setup(tmp_path, 60, max_steps=60, lr=3e-2, checkpoint_every=30, plot=True)
    trainer.evaluate = evaluate
    trainer.config.eval_every = 25
    trainer.config.best_metric, trainer.config.best_mode = "valid_mse", "min"
    result = trainer.train()

    records = read_log(tmp_path / "log.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(2, 61, 2))
    keys = {"kind", "step", "epoch", "loss", "lr", "grad_norm", "items", "items_per_s", "elapsed"}
    assert all(set(r) == keys for r in train)
    assert [r["step"] for r in records if r["kind"] == "eval"] == evaluations == [25, 50, 60]
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.15 * train[0]["loss"]
    assert result.final_loss is not None and result.best is not None
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "best" / "model.safetensors").exists()
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 60


def test_time_budget_and_epochs_stop(tmp_path: Path) -> None:
    result = _setup(tmp_path / "t", max_steps=None, time_budget_minutes=1e-4).train()
    assert result.step >= 1 and result.elapsed_seconds >= 6e-3
    result = _setup(tmp_path / "e", max_steps=None, max_epochs=2).train()
    assert (result.step, result.epoch) == (16, 2)


def test_config_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        TrainConfig(run_dir=tmp_path)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(run_dir=tmp_path, lr=0.0, max_steps=1)
    with pytest.raises(TypeError, match="max_steps"):
        TrainConfig(run_dir=tmp_path, max_steps=1.5)  # type: ignore[arg-type]


def test_weight_average_is_the_mean_of_the_sampled_weights() -> None:
    from types import SimpleNamespace

    from multihead.training import WeightAverage

    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, every=2, start=0.5)
    samples = []
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(-float(step))
        average(SimpleNamespace(step=step, progress=lambda step=step: step / 8))
        if step % 2 == 0 and step / 8 >= 0.5:
            samples.append(float(step))
    assert average.count == len(samples) == 3  # steps 4, 6 and 8
    state = average.state_dict()
    torch.testing.assert_close(state["weight"], torch.full((1, 2), sum(samples) / 3))
    torch.testing.assert_close(state["bias"], torch.full((1,), -sum(samples) / 3))
