"""Attention kernels: each module has NAME, unsupported, forward and explain (of a Request).

``auto`` runs a kernel whose ``preferred(request)`` gives a reason if there is one, else the
first in KERNELS order that supports the request; the reference kernel supports everything.
"""

from types import ModuleType

from . import reference, sdpa, tiled
from .base import Request

KERNELS: dict[str, ModuleType] = {
    sdpa.NAME: sdpa,
    reference.NAME: reference,
    tiled.NAME: tiled,
}

__all__ = ["KERNELS", "Request", "reference", "sdpa", "tiled"]
