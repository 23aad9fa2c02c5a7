"""The sizes the commands accept, checked while the arguments are parsed.

A beam width, a length or a batch the machine cannot hold is refused before anything is
loaded or allocated, in one line that names the limit, rather than growing until the process
is killed. Each limit is far above what the shipped models use or gain from.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "BEAM",
    "MAX_BEAM",
    "MAX_DECODE_ROWS",
    "MAX_UTTERANCES",
    "bounded_int",
    "check_model_fits",
    "decode_batch",
    "memory_gigabytes",
]

# Beam search keeps width × sentences hypotheses, each with its own key/value caches; past a
# few dozen the translations stop changing and the caches stop fitting.
MAX_BEAM = 64
# Hypotheses decoded at once: sentences per batch shrink as the beam grows (~0.5 GB of caches
# for the shipped translation model at its longest).
MAX_DECODE_ROWS = 256
# Synthesised evaluation utterances are held in memory (about 130 kB each).
MAX_UTTERANCES = 5000


def bounded_int(low: int, high: int, why: str) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in [low, high]; ``why`` names the limit."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}] ({why}), got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def decode_batch(beam: int) -> int:
    """Sentences decoded together so that at most `MAX_DECODE_ROWS` hypotheses are live."""
    return max(1, MAX_DECODE_ROWS // beam)


BEAM = bounded_int(1, MAX_BEAM, "each hypothesis of a beam holds its own key/value caches")


def memory_gigabytes() -> float | None:
    """This machine's physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits(build: Callable[[Any], nn.Module], config: Any) -> None:
    """Refuse, before allocating it, a model whose training state (fp32 weights, gradients and
    AdamW's two moments: 16 bytes a parameter) exceeds this machine's memory. The model is
    built on the meta device to count; a model that cannot be built there is not checked."""
    try:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in build(config).parameters())
    except Exception:  # a twin that needs real tensors to build: no estimate
        return
    needed, memory = 16 * parameters / 1e9, memory_gigabytes()
    if memory is not None and needed > memory:
        raise ValueError(
            f"the model has {parameters:,} parameters: training it needs about {needed:,.1f} GB "
            f"(weights, gradients and optimiser state), more than this machine's "
            f"{memory:,.1f} GB; use a smaller --d-model, --ff or number of layers"
        )
