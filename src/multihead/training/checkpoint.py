"""Training checkpoints: a directory with the weights and everything needed to resume.

``model.safetensors`` holds the weights (safe to share, no pickle); ``state.pt`` holds the
optimizer and scheduler states, the RNG states (torch, numpy, python) and the position in
the data (step, epoch, batches consumed in the epoch). ``state.pt`` only contains tensors
and plain Python values, so it loads with ``torch.load(..., weights_only=True)``.

Each file is written to a temporary name, flushed to disk and renamed over the old one, so a
crash while saving leaves the previous checkpoint intact. Both files record the step, and
loading refuses a pair whose steps differ.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "Checkpoint",
    "atomic_write",
    "capture_rng",
    "has_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

WEIGHTS = "model.safetensors"
STATE = "state.pt"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What `load_checkpoint` read besides the tensors it put back into the objects."""

    step: int
    epoch: int
    position: int
    rng: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry; flush it too (not possible on Windows).
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(path: Path, write: Callable[[Path], None]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    return tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)``, fsync the file, then rename it to ``path`` in one step."""
    path = Path(path)
    tmp = _write_temp(path, write)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def capture_rng() -> dict[str, Any]:
    """The torch, numpy and python RNG states, as tensors and plain values (weights_only-safe)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states taken by `capture_rng`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def has_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a complete checkpoint."""
    directory = Path(directory)
    return (directory / WEIGHTS).is_file() and (directory / STATE).is_file()


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    *,
    step: int,
    epoch: int = 0,
    position: int = 0,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Write a checkpoint of ``model`` (and the training state) into ``directory``.

    ``position`` is the number of batches already consumed in ``epoch``; ``extra`` holds any
    other plain values the caller wants back (best metric, elapsed time, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("step", step), ("epoch", epoch), ("position", position)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "position": position,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng() if rng else None,
        "extra": dict(extra or {}),
    }
    metadata = {"step": str(step), "format_version": str(FORMAT_VERSION)}
    # Both files are complete on disk before either replaces its predecessor.
    weights_tmp = _write_temp(
        directory / WEIGHTS, lambda tmp: save_model(model, str(tmp), metadata=metadata)
    )
    state_tmp = _write_temp(directory / STATE, lambda tmp: torch.save(state, tmp))
    os.replace(weights_tmp, directory / WEIGHTS)
    os.replace(state_tmp, directory / STATE)
    _fsync_dir(directory)
    return directory


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    *,
    restore_rng_state: bool = False,
) -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint` into ``model`` (and optimizer, scheduler).

    The RNG states are returned in `Checkpoint.rng`; with ``restore_rng_state`` they are also
    put back at once (the trainer defers this until the data iterator is back in place).
    """
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no checkpoint in {directory} (expected {WEIGHTS} and {STATE})")
    state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / STATE} has format version {state.get('format_version')!r}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    with safe_open(directory / WEIGHTS, framework="pt") as handle:
        weights_step = (handle.metadata() or {}).get("step")
    if weights_step != str(state["step"]):
        raise ValueError(
            f"checkpoint {directory} is inconsistent: weights are from step {weights_step} but "
            f"the training state is from step {state['step']} (interrupted while saving?)"
        )
    missing, unexpected = load_model(model, directory / WEIGHTS, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not fit the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {directory} has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"checkpoint {directory} has no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng_state and state["rng"] is not None:
        restore_rng(state["rng"])
    return Checkpoint(
        step=state["step"],
        epoch=state["epoch"],
        position=state["position"],
        rng=state["rng"],
        extra=state["extra"],
    )
