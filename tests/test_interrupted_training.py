"""Interrupted training loses nothing.

A run killed with SIGKILL in the middle, then resumed, ends with weights bitwise equal to
those of a run that was never interrupted (same seed; CPU, one thread in both processes, so
every reduction happens in the same order). A crash at any point of a checkpoint save leaves a
complete checkpoint to resume from. A damaged or truncated checkpoint is refused with a clear
error and the previous good one is still there.

Run as a script (``python tests/test_interrupted_training.py RUN_DIR``), this file is the
training run that the SIGKILL test kills.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from multihead.models import LMConfig, TransformerLM
from multihead.training import (
    CheckpointError,
    TrainConfig,
    Trainer,
    find_checkpoint,
    load_checkpoint,
    read_log,
    save_checkpoint,
)
from multihead.training import checkpoint as checkpoint_module

MAX_STEPS = 24
VOCAB = 13


def build(run_dir: Path, *, resume: bool = False, delay: float = 0.0) -> Trainer:
    """A tiny language model (dropout on, so the RNG states matter) on fixed random tokens:
    6 batches per epoch, so 24 steps are 4 epochs and a kill lands mid-epoch."""
    config = LMConfig(
        vocab_size=VOCAB, d_model=16, num_heads=2, num_layers=1, dim_feedforward=32,
        max_len=8, dropout=0.1,
    )  # fmt: skip
    torch.manual_seed(1)
    model = TransformerLM(config)
    data = torch.randint(0, VOCAB, (24, 9), generator=torch.Generator().manual_seed(0))

    def batches(epoch: int) -> list[Tensor]:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        return list(data[order].split(4))

    def loss_fn(batch: Tensor):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), {}

    def after_step(trainer: Trainer) -> None:
        if delay:
            print(f"step {trainer.step}", flush=True)
            time.sleep(delay)

    settings = TrainConfig(
        run_dir=run_dir, lr=3e-3, max_steps=MAX_STEPS, log_every=1, checkpoint_every=3,
        resume=resume, progress_bar=False, plot=False, seed=5,
    )  # fmt: skip
    return Trainer(model, loss_fn, batches, settings, after_step=after_step)


def weights(trainer: Trainer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, Tensor], list[dict]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer = build(run_dir)
    trainer.train()
    return weights(trainer), read_log(run_dir / "log.jsonl")


def losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


# -- SIGKILL in the middle of a run --------------------------------------------------------------


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, __file__, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        for line in process.stdout:  # the run prints "step N" after each update
            seen.append(line.strip())
            if line.strip() == "step 11" or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGKILL)  # mid-run, with no chance to clean up
    finally:
        process.kill()
        process.wait(timeout=30)
    assert "step 11" in seen, (seen, process.stderr.read() if process.stderr else "")
    assert process.returncode == -signal.SIGKILL

    found = find_checkpoint(run_dir / "last")
    assert found is not None
    killed_at = load_checkpoint(found, build(tmp_path / "probe").model).step
    assert 9 <= killed_at < MAX_STEPS  # the last save before the kill (every 3 steps)

    resumed = build(run_dir, resume=True)
    result = resumed.train()
    expected_weights, expected_log = uninterrupted
    assert result.step == MAX_STEPS
    assert_bitwise_equal(weights(resumed), expected_weights)
    assert losses(read_log(run_dir / "log.jsonl")) == losses(expected_log)


# -- a crash at every point of a save ------------------------------------------------------------


class Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it)."""


CRASH_POINTS = [
    ("save_model", 1),  # writing the weights into the temporary directory
    ("torch.save", 1),  # writing the training state
    ("_sha256", 1),  # computing the checksums
    ("shutil.rmtree", 1),  # before dropping the checkpoint before the previous one
    ("os.replace", 1),  # before renaming last → last.previous
    ("os.replace", 2),  # between the two renames: only last.previous is left
]


@pytest.mark.parametrize(("target", "nth"), CRASH_POINTS, ids=[f"{t}-{n}" for t, n in CRASH_POINTS])
def test_crash_during_a_save_leaves_a_checkpoint_to_resume_from(
    target, nth, tmp_path, monkeypatch, uninterrupted
):
    run_dir = tmp_path / "run"
    owner = {"torch.save": torch, "shutil.rmtree": shutil, "os.replace": os}.get(
        target, checkpoint_module
    )
    attribute = target.split(".")[-1]
    original = getattr(owner, attribute)
    calls = {"armed": False, "count": 0}

    def crashing(*args, **kwargs):
        if calls["armed"]:
            calls["count"] += 1
            if calls["count"] == nth:
                raise Crash(target)
        return original(*args, **kwargs)

    real_save = checkpoint_module.save_checkpoint

    def save_and_maybe_crash(directory, *args, step, **kwargs):
        calls["armed"] = step == 9  # the third save: last (6) and last.previous (3) exist
        try:
            return real_save(directory, *args, step=step, **kwargs)
        finally:
            calls["armed"] = False

    from multihead.training import loop

    monkeypatch.setattr(owner, attribute, crashing)
    monkeypatch.setattr(loop, "save_checkpoint", save_and_maybe_crash)
    with pytest.raises(Crash):
        build(run_dir).train()
    monkeypatch.undo()

    found = find_checkpoint(run_dir / "last")
    assert found is not None
    assert load_checkpoint(found, build(tmp_path / "probe").model).step == 6
    assert found.name == ("last.previous" if (target, nth) == ("os.replace", 2) else "last")

    resumed = build(run_dir, resume=True)
    resumed.train()
    assert_bitwise_equal(weights(resumed), uninterrupted[0])


def test_leftovers_of_a_killed_save_are_cleaned_up(tmp_path):
    model = build(tmp_path / "probe").model
    stale = tmp_path / ".last.tmp-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path / "last", model, step=1)
    save_checkpoint(tmp_path / "last", model, step=2)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "last.previous"]
    assert load_checkpoint(tmp_path / "last.previous", model).step == 1


# -- damaged checkpoints -------------------------------------------------------------------------


def _flip(path: Path, where: float = 0.8) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "state truncated": lambda d: _truncate(d / "state.pt"),
    "state empty": lambda d: (d / "state.pt").write_bytes(b""),
    "state bit flip": lambda d: _flip(d / "state.pt"),
    "weights truncated": lambda d: _truncate(d / "model.safetensors"),
    "weights bit flip": lambda d: _flip(d / "model.safetensors"),
    "checksums garbage": lambda d: (d / "checksums.json").write_text("{not json"),
    # Without checksums (as written by older versions) the readers themselves must object.
    "no checksums, state truncated": lambda d: (
        (d / "checksums.json").unlink(),
        _truncate(d / "state.pt"),
    ),
    "no checksums, weights truncated": lambda d: (
        (d / "checksums.json").unlink(),
        _truncate(d / "model.safetensors", keep=0.97),
    ),
    "no checksums, state from another step": lambda d: (
        (d / "checksums.json").unlink(),
        shutil.copy(d.with_name("last.previous") / "state.pt", d / "state.pt"),
    ),
}


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    """A run stopped after 6 steps: last/ holds step 6, last.previous/ step 3."""
    run_dir = tmp_path_factory.mktemp("six")
    trainer = build(run_dir)
    trainer.config.max_steps = 6
    trainer.train()
    return run_dir


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_and_the_previous_is_intact(damage, six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    previous = _digest(run_dir / "last.previous")
    DAMAGE[damage](run_dir / "last")

    trainer = build(run_dir, resume=True)
    before = weights(trainer)
    with pytest.raises(CheckpointError) as info:
        trainer.train()
    message = str(info.value)
    assert f"checkpoint {run_dir / 'last'} cannot be used" in message
    assert f"previous checkpoint {run_dir / 'last.previous'} (step 3) is intact" in message
    assert "\n" not in message
    assert _digest(run_dir / "last.previous") == previous
    if not damage.startswith("weights"):  # refused before the weights were touched
        assert_bitwise_equal(weights(trainer), before)


def test_after_moving_the_damaged_one_away_resume_uses_the_previous(
    six_steps, tmp_path, uninterrupted
):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    _truncate(run_dir / "last" / "model.safetensors")
    (run_dir / "last").rename(tmp_path / "damaged")
    resumed = build(run_dir, resume=True)
    assert resumed.train().step == MAX_STEPS
    assert_bitwise_equal(weights(resumed), uninterrupted[0])


def test_saving_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    model = build(tmp_path / "probe").model
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a checkpoint"):
        save_checkpoint(tmp_path / "notes", model, step=1)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "years of work"


if __name__ == "__main__":  # the run that the SIGKILL test kills
    torch.set_num_threads(1)  # as the test process (conftest.py): the same reduction order
    build(Path(sys.argv[1]), delay=0.05).train()
