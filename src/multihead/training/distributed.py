"""Data parallelism for the training loop: one process per core or GPU, under ``torchrun``.

    torchrun --nproc-per-node 2 -m multihead.cli train image --threads 1

Every process holds the whole model and trains on its own rows of each global batch;
`DistributedDataParallel` averages the gradients during the backward pass, so every process
takes the same update, and the run is the single-process run with the same global batch up
to the order of floating-point sums. The backend follows the hardware: gloo, plus NCCL for
CUDA tensors where there are GPUs. Rank 0 alone writes logs and checkpoints.

What an application adds (see ``apps/image.py``): `setup` first; ``net = wrap(model)``,
called in the loss function and passed to the `Trainer`; ``batches(epoch)`` yields this
process's `rows` of each global batch with the global batch's size, and the loss is
multiplied by `mean_share`; work after training (scores, saving) only where `is_main`.

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op: world size 1,
rank 0, `wrap` returns the model itself, `rows` the whole batch, `mean_share` 1.0.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "Context",
    "all_equal",
    "barrier",
    "choose_backend",
    "context",
    "is_main",
    "launched",
    "mean_share",
    "rank",
    "rows",
    "setup",
    "sum_all",
    "teardown",
    "unwrap",
    "world_size",
    "wrap",
]


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: a single process, no process group


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def choose_backend() -> str:
    """gloo for CPU tensors; with GPUs also NCCL, which routes CUDA tensors to it (the apps
    train on the CPU, which NCCL cannot reduce, so gloo stays for those)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes logs, checkpoints, models and reports."""
    return rank() == 0


def context() -> Context:
    """This process's place in the job (rank 0 of 1 when there is no process group)."""
    if world_size() == 1:
        return Context(0, 0, 1, torch.device("cpu"), None)
    local_rank = _env_int("LOCAL_RANK", rank())
    return Context(rank(), local_rank, world_size(), _device(local_rank), dist.get_backend())


def setup() -> Context:
    """Join the ``torchrun`` job described by the environment (once; later calls only report).

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; the process group is read from them (``env://``).
    """
    if launched() and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE is set but {name} is not: launch with torchrun")
        device = _device(_env_int("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(choose_backend())
        atexit.register(teardown)
    return context()


def teardown() -> None:
    """Leave the process group (safe to call twice, or without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if world_size() > 1:
        dist.barrier()


def sum_all(values: Tensor) -> Tensor:
    """The element-wise sum of ``values`` over all processes (``values`` itself, reduced in
    place; unchanged in a single process)."""
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_equal(value: float) -> bool:
    """Whether every process passed the same ``value`` (one all-reduce of [v, -v] by max)."""
    if world_size() == 1:
        return True
    both = torch.tensor([float(value), -float(value)], dtype=torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[0].item() == -both[1].item()


def wrap(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` when there are several processes, else ``model``.

    Call the wrapper, not ``model``, in the loss function: DDP arms its gradient average in
    the wrapper's forward pass, and a forward through the bare module trains each process on
    its own gradients, silently. Evaluate and save the bare module (`unwrap`).
    """
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a `DistributedDataParallel` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def rows(batch: Tensor) -> Tensor:
    """This process's contiguous slice of the rows (dim 0) of a global batch.

    Sizes differ by at most one row; weight the loss with `mean_share` so the gradient is
    still that of the global batch's mean.
    """
    world = world_size()
    if len(batch) < world:
        raise ValueError(
            f"a global batch of {len(batch)} rows cannot be split over {world} processes: "
            "use a larger batch or fewer processes"
        )
    return batch.tensor_split(world)[rank()] if world > 1 else batch


def mean_share(count: float, total: float) -> float:
    """The weight of this process's mean loss over ``count`` of the global batch's ``total``
    items (examples or tokens): ``count × world / total``.

    DDP averages the gradients of the processes; with this weight the average is exactly the
    gradient of the mean over the global batch, even when the processes' shares differ (a
    token-level mean over unequal token counts). It is 1.0 in a single process.
    """
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    return count * world_size() / total
