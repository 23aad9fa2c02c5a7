"""The error every command raises for a mistake in what the user asked for."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""
