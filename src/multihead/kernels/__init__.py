"""Attention kernels behind `multihead.attention`, each a `Kernel`.

``auto`` runs a kernel whose ``preferred(request)`` gives a reason if there is one, else the
first in KERNELS order that supports the request; the reference kernel supports everything.
On the CPU the tiled kernel is preferred for sparse long masks and large score mods; off the
CPU (and inside ``torch.compile``) FlexAttention takes those, so ``auto`` never runs a
Python loop over tiles there.
"""

from typing import Protocol

from torch import Tensor

from . import flex, reference, sdpa, tiled
from .base import Request


class Kernel(Protocol):
    """What a kernel answers: its name, why it cannot or should run a request, the
    computation, and one line for `multihead.explain`."""

    NAME: str

    def unsupported(self, request: Request) -> str | None:
        """Why this kernel cannot run ``request``, or None when it can."""
        ...

    def preferred(self, request: Request) -> str | None:
        """Why ``auto`` should pick this kernel for ``request`` over the KERNELS order, or
        None."""
        ...

    def forward(self, request: Request) -> tuple[Tensor, Tensor | None]:
        """The output (batch, heads, q_len, value_dim), and the weights (batch, heads, q_len,
        k_len) when ``request.return_weights`` is set, else None."""
        ...

    def explain(self, request: Request) -> str:
        """One line: this kernel on ``request``, and why."""
        ...


KERNELS: dict[str, Kernel] = {
    sdpa.NAME: sdpa,  # type: ignore[dict-item]
    reference.NAME: reference,  # type: ignore[dict-item]
    tiled.NAME: tiled,  # type: ignore[dict-item]
    flex.NAME: flex,  # type: ignore[dict-item]
}
"""Every kernel by name, in the order ``auto`` tries them."""

__all__ = ["KERNELS", "Kernel", "Request", "flex", "reference", "sdpa", "tiled"]
