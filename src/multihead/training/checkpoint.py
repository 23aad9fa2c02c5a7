"""Training checkpoints: a directory with the weights and everything needed to resume.

``model.safetensors`` holds the weights (safe to share, no pickle); ``state.pt`` holds the
optimizer and scheduler states, the RNG states (torch, numpy, python) and the position in
the data (step, epoch, batches consumed in the epoch). ``state.pt`` only contains tensors
and plain Python values, so it loads with ``torch.load(..., weights_only=True)``.

Saving never touches the checkpoint in place. The files are written into a fresh temporary
directory beside it (each fsynced), with ``checksums.json`` (their SHA-256); then the old
checkpoint is renamed to ``<name>.previous`` and the new directory to ``<name>``. So a
crash at any moment leaves a complete checkpoint: ``<name>``, or ``<name>.previous`` if the
crash fell between the two renames (`find_checkpoint` looks there), and the last good
checkpoint before the newest is kept as ``<name>.previous``.

Loading checks before it trusts: the checksums (a truncated or damaged file is named), the
weights file's header against the model (names, shapes, dtypes, before anything is read),
and ``state.pt`` only through ``torch.load(..., weights_only=True)``, which refuses a pickle
that would run code. Any of these raises `CheckpointError` (a ``ValueError``) that says
what is wrong and where the previous good checkpoint is.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..safe_files import check_against, read_header

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "capture_rng",
    "find_checkpoint",
    "has_checkpoint",
    "load_checkpoint",
    "previous_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

WEIGHTS = "model.safetensors"
STATE = "state.pt"
CHECKSUMS = "checksums.json"
FORMAT_VERSION = 1
PREVIOUS_SUFFIX = ".previous"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, truncated, inconsistent or unsafe."""


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


def previous_checkpoint(directory: str | os.PathLike[str]) -> Path:
    """Where `save_checkpoint` keeps the checkpoint that ``directory`` replaced."""
    directory = Path(directory)
    return directory.with_name(directory.name + PREVIOUS_SUFFIX)


def find_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """``directory`` if it holds a checkpoint, else its previous one if that does, else None.

    Only a crash between the two renames of a save leaves the previous one alone.
    """
    for candidate in (Path(directory), previous_checkpoint(directory)):
        if has_checkpoint(candidate):
            return candidate
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _ours(directory: Path) -> bool:
    """Whether ``directory`` holds only what `save_checkpoint` writes (safe to replace)."""
    names = {WEIGHTS, STATE, CHECKSUMS}
    return directory.is_dir() and all(
        child.name in names or child.name.startswith(".") for child in directory.iterdir()
    )


def _step_of(directory: Path) -> str:
    """The step a checkpoint's weights record, for messages ("?" if unreadable)."""
    try:
        return read_header(directory / WEIGHTS).metadata.get("step", "?")
    except (OSError, ValueError):
        return "?"


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
    previous = previous_checkpoint(directory)
    for existing in (directory, previous):
        if existing.exists() and not _ours(existing):
            raise ValueError(
                f"{existing} exists and holds files that are not a checkpoint's; "
                "refusing to replace it: choose another directory"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
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
    # Leftovers of saves that were killed half-way.
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        save_model(model, str(tmp / WEIGHTS), metadata=metadata)
        torch.save(state, tmp / STATE)
        sums = {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)}
        (tmp / CHECKSUMS).write_text(json.dumps({"step": step, "sha256": sums}) + "\n")
        for name in (WEIGHTS, STATE, CHECKSUMS):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        # The new checkpoint is complete on disk; now swap it in with two renames.
        if has_checkpoint(directory):
            if previous.exists():
                shutil.rmtree(previous)
            os.replace(directory, previous)
        elif directory.exists():  # an incomplete leftover: the previous one stays
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    previous = previous_checkpoint(directory)

    def damaged(problem: str) -> CheckpointError:
        if has_checkpoint(previous):
            advice = (
                f"; the previous checkpoint {previous} (step {_step_of(previous)}) is intact: "
                f"move {directory} away to resume from it"
            )
        else:
            advice = "; there is no previous checkpoint to fall back on"
        return CheckpointError(f"checkpoint {directory} cannot be used: {problem}{advice}")

    if not has_checkpoint(directory):
        hint = f" ({previous} holds the previous one)" if has_checkpoint(previous) else ""
        raise FileNotFoundError(
            f"no checkpoint in {directory} (expected {WEIGHTS} and {STATE}){hint}"
        )
    _verify_checksums(directory, damaged)
    try:
        state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1][:200]
        raise damaged(
            f"{STATE} was refused by torch.load(weights_only=True): it holds something other "
            f"than tensors and plain values, such as a pickle that would run code ({reason})"
        ) from None
    except Exception as error:  # truncated zip, empty file, not a torch file at all
        raise damaged(f"{STATE} cannot be read ({type(error).__name__}: {error})") from None
    _check_state(state, damaged)
    if state["format_version"] != FORMAT_VERSION:
        raise damaged(
            f"{STATE} has format version {state['format_version']!r}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    try:
        header = read_header(directory / WEIGHTS)
    except ValueError as error:
        raise damaged(str(error)) from None
    weights_step = header.metadata.get("step")
    if weights_step != str(state["step"]):
        raise damaged(
            f"it is inconsistent: weights are from step {weights_step} but the training state "
            f"is from step {state['step']} (interrupted while saving?)"
        )
    # Names, shapes and dtypes against the model, before a single tensor is read. Tied
    # weights are stored once (safetensors refuses shared tensors), under one of their names.
    expected = model.state_dict()
    by_storage: dict[tuple[int, int], list[str]] = {}
    for name, tensor in expected.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        by_storage.setdefault(key, []).append(name)
    tied = frozenset(name for names in by_storage.values() if len(names) > 1 for name in names)
    try:
        check_against(header, expected, what=f"the model ({type(model).__name__})", optional=tied)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {directory} does not fit the model: {error}") from None
    missing, unexpected = load_model(model, directory / WEIGHTS, strict=False)
    if missing or unexpected:
        raise CheckpointError(
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


def _verify_checksums(directory: Path, damaged: Callable[[str], CheckpointError]) -> None:
    """Compare each file with the SHA-256 recorded when it was saved (older checkpoints,
    written before checksums, have none and skip this)."""
    path = directory / CHECKSUMS
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise damaged(f"{CHECKSUMS} is unreadable")
    for name in (WEIGHTS, STATE):
        if name in recorded and _sha256(directory / name) != recorded[name]:
            raise damaged(
                f"{name} does not match the SHA-256 saved with it: the file is damaged or "
                "truncated, or the checkpoint is inconsistent (a file from another save)"
            )


def _check_state(state: object, damaged: Callable[[str], CheckpointError]) -> None:
    """The training state must be the dict `save_checkpoint` writes, with sane positions."""
    if not isinstance(state, dict):
        raise damaged(f"{STATE} holds a {type(state).__name__}, not a training state")
    keys = ("format_version", "step", "epoch", "position", "optimizer", "scheduler", "rng", "extra")
    missing = [key for key in keys if key not in state]
    if missing:
        raise damaged(f"{STATE} lacks {missing}")
    for key in ("step", "epoch", "position"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise damaged(f"{STATE} has {key}={value!r}, not a non-negative int")
    if not isinstance(state["extra"], dict):
        raise damaged(f"{STATE} has extra of type {type(state['extra']).__name__}, not a dict")
