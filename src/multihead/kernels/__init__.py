"""Attention kernels. Each module has NAME, unsupported(request), forward(request), explain(request).

``auto`` tries them in KERNELS order (fastest first) and runs the first that supports the
request; the reference kernel supports everything.
"""

from types import ModuleType

from . import reference, sdpa
from .base import Request

KERNELS: dict[str, ModuleType] = {sdpa.NAME: sdpa, reference.NAME: reference}

__all__ = ["KERNELS", "Request", "reference", "sdpa"]
