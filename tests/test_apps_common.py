"""The training skeleton the three apps share (apps/common.py): a shared flag parses the same
way in every app, each app keeps its own defaults, the Makefile recipes still parse, and the
trainer built from the flags is configured by them."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from multihead.apps import common
from multihead.training import Trainer, warmup_cosine_factor
from multihead.training.checkpoint import STATE, WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


def _image() -> tuple[Callable[[], argparse.ArgumentParser], common.Defaults]:
    from multihead.apps import image

    return image.build_parser, image.DEFAULTS


def _speech() -> tuple[Callable[[], argparse.ArgumentParser], common.Defaults]:
    from multihead.apps.speech import train

    return train.build_parser, train.DEFAULTS


def _translate() -> tuple[Callable[[], argparse.ArgumentParser], common.Defaults]:
    pytest.importorskip("sacrebleu", reason="the translation app needs pip install -e '.[apps]'")
    from multihead.apps.translate import train

    return train.build_parser, train.DEFAULTS


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where the default run directories hold no runs of this checkout."""
    monkeypatch.chdir(tmp_path)


APPS = {"image": _image, "speech": _speech, "translate": _translate}

SHARED = [
    *("--run-dir", "RUN", "--minutes", "3", "--epochs", "2", "--max-steps", "7"),
    *("--eval-every", "11", "--seed", "5", "--threads", "3", "--resume", "--no-progress"),
    *("--d-model", "16", "--heads", "2", "--ffn", "32", "--dropout", "0.25"),
    *("--lr", "0.5", "--warmup", "9", "--schedule", "inverse-sqrt"),
    *("--weight-decay", "0.2", "--clip", "0.75"),
]
EXPECTED = {
    "minutes": 3.0,
    "epochs": 2,
    "steps": 7,
    "eval_every": 11,
    "seed": 5,
    "threads": 3,
    "resume": True,
    "overwrite": False,
    "no_progress": True,
    "d_model": 16,
    "heads": 2,
    "ff": 32,
    "dropout": 0.25,
    "lr": 0.5,
    "warmup": 9,
    "schedule": "inverse-sqrt",
    "weight_decay": 0.2,
    "clip": 0.75,
}


def _parse(app: str, argv: list[str]) -> argparse.Namespace:
    build_parser, defaults = APPS[app]()
    return common.parse_args(build_parser(), argv, defaults)


@pytest.mark.parametrize("app", sorted(APPS))
def test_shared_flags_parse_the_same_in_every_app(app: str, tmp_path: Path) -> None:
    argv = [str(tmp_path) if a == "RUN" else a for a in SHARED]
    args = _parse(app, argv)
    assert {key: getattr(args, key) for key in EXPECTED} == EXPECTED
    assert args.run_dir == tmp_path
    # Either spelling of the step limit and of the feed-forward width means the same.
    again = _parse(app, ["--steps", "7", "--ff", "32"])
    assert (again.steps, again.ff) == (7, 32)


def test_each_app_keeps_its_own_defaults() -> None:
    image, speech = _parse("image", []), _parse("speech", [])
    assert (image.lr, image.threads, image.minutes, image.weight_decay) == (3e-3, 1, 5.0, 0.05)
    assert image.model_dir == Path("models/image-digits") and not hasattr(image, "beam")
    assert (speech.lr, speech.minutes, speech.average_fraction) == (2.5e-3, 20.0, 0.25)
    assert not hasattr(speech, "model_dir")  # its model goes inside the run
    assert not hasattr(image, "average_fraction")  # the image app averages no weights


def test_translate_budget_applies_only_without_another_limit() -> None:
    assert _parse("translate", []).minutes == 50.0
    assert _parse("translate", ["--steps", "4"]).minutes is None
    assert _parse("translate", ["--minutes", "2"]).minutes == 2.0


@pytest.mark.parametrize("app", sorted(APPS))
def test_makefile_recipes_parse(app: str) -> None:
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(rf"^{app.upper()}_RECIPE := (.*)$", makefile, re.M)
    assert recipe is not None, f"no {app.upper()}_RECIPE in the Makefile"
    args = _parse(app, shlex.split(recipe.group(1)))
    assert args.minutes is not None


@pytest.mark.parametrize("app", sorted(APPS))
def test_an_existing_run_needs_resume_or_overwrite(
    app: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "last").mkdir()
    for name in (WEIGHTS, STATE):
        (tmp_path / "last" / name).write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        _parse(app, ["--run-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "already holds a run: pass --resume or --overwrite" in capsys.readouterr().err
    assert _parse(app, ["--run-dir", str(tmp_path), "--overwrite"]).overwrite


def _tiny_trainer(args: argparse.Namespace, **keywords: Any) -> tuple[Trainer, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x = torch.randn(16, 2)

    def loss_fn(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return model(batch).pow(2).mean(), {}

    def batches(epoch: int) -> list[torch.Tensor]:
        return list(x.split(4))

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        return {"step": float(step)}

    trainer = common.build_trainer(
        args, model, loss_fn, batches, evaluate=evaluate, log_every=1, **keywords
    )
    return trainer, model


def test_the_trainer_follows_the_flags(tmp_path: Path) -> None:
    argv = ["--run-dir", str(tmp_path), "--steps", "4", "--warmup", "1", "--no-progress"]
    argv += ["--lr", "0.1", "--eval-every", "2", "--clip", "0.5", "--average-every", "1"]
    args = _parse("speech", argv)
    average = common.weight_average(nn.Linear(1, 1), args)
    trainer, _ = _tiny_trainer(args, rate_key="frames", average=average)
    config = trainer.config
    assert (config.lr, config.max_steps, config.grad_clip, config.seed) == (0.1, 4, 0.5, 0)
    assert (config.eval_every, config.checkpoint_every, config.rate_key) == (2, 2, "frames")
    assert config.time_budget_minutes == 20.0 and config.run_dir == tmp_path
    assert trainer.after_step is average
    trainer.config.plot = False
    trainer.train()
    # The cosine ends with the run by the trainer's own progress (3 of 4 updates when the
    # last update's learning rate was set).
    last = warmup_cosine_factor(4, 1, progress=3 / 4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * last)
    assert (tmp_path / "train_config.json").is_file()


def test_inverse_sqrt_and_no_averaging(tmp_path: Path) -> None:
    argv = ["--run-dir", str(tmp_path), "--steps", "2", "--warmup", "4"]
    args = _parse("speech", [*argv, "--schedule", "inverse-sqrt", "--average-fraction", "0"])
    trainer, _ = _tiny_trainer(args, average=common.weight_average(nn.Linear(1, 1), args))
    assert trainer.after_step is None  # --average-fraction 0: nothing collects weights
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(args.lr / 4)


def test_results_go_to_the_run_and_beside_the_model(tmp_path: Path) -> None:
    args = _parse("image", ["--run-dir", str(tmp_path / "run")])
    args.run_dir.mkdir()
    common.write_results(args, {"acc": 1.0, "args": common.record(args)}, tmp_path / "model")
    assert '"acc": 1.0' in (tmp_path / "run" / "metrics.json").read_text()
    assert '"run_dir": "' in (tmp_path / "model" / "results.json").read_text()
