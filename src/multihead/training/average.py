"""Weight averaging over the end of a run: a cheap stand-in for averaging checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["WeightAverage"]


class WeightAverage:
    """Mean of the weights sampled every ``every`` steps once the run is ``start`` done.

    A cheap stand-in for averaging the last checkpoints: it smooths out the noise of the
    last updates. Kept in memory, so a resumed run averages only what it saw itself.
    """

    def __init__(self, model: torch.nn.Module, every: int, start: float) -> None:
        self.model, self.every, self.start = model, every, start
        self.sum: dict[str, Tensor] | None = None
        self.count = 0

    def __call__(self, trainer: Trainer) -> None:
        if trainer.step % self.every or trainer.progress() < self.start:
            return
        state = self.model.state_dict()
        if self.sum is None:
            self.sum = {k: v.detach().double().clone() for k, v in state.items()}
        else:
            for key, value in state.items():
                self.sum[key] += value.detach().double()
        self.count += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, as the model's state dict (each in its parameter's dtype);
        ValueError before any were collected."""
        if self.sum is None:
            raise ValueError("no weights collected yet")
        state = self.model.state_dict()
        return {k: (v / self.count).to(state[k].dtype) for k, v in self.sum.items()}
