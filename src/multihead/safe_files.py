"""Reading weights files that anyone may have written: check the header, then allocate.

A safetensors file starts with a JSON header that lists every tensor's name, dtype, shape and
byte range; the `safetensors` library checks that the ranges cover the file exactly. Reading
that header costs nothing, so every loader in the library compares it with what the model
expects (names, shapes, dtypes) before a single tensor is read, and a file that does not fit
is refused with a ``ValueError`` naming the tensor. No pickle is involved.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

__all__ = ["Header", "check_against", "read_header"]

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Header:
    """What a safetensors file says it holds: name → (shape, dtype), and its metadata."""

    path: Path
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype | str]]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the file holds (its size minus the header)."""
        total = 0
        for shape, dtype in self.tensors.values():
            size = torch.Size(shape).numel()
            total += size * (dtype.itemsize if isinstance(dtype, torch.dtype) else 1)
        return total


def read_header(path: str | os.PathLike[str]) -> Header:
    """The header of ``path`` without reading any tensor; ValueError if it is not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            tensors: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
            for name in file.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                piece = file.get_slice(name)
                code = piece.get_dtype()
                tensors[name] = (tuple(piece.get_shape()), DTYPES.get(code, code))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    return Header(path, tensors, metadata)


def check_against(
    header: Header,
    expected: Mapping[str, Tensor],
    *,
    what: str,
    convert_floats: bool = False,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Refuse ``header`` unless it holds exactly the tensors of ``expected``, shape for shape.

    ``expected`` is a state dict (meta tensors will do: only shapes and dtypes are read).
    Dtypes must match, except that with ``convert_floats`` a floating tensor may be stored in
    another floating precision (it is converted when loaded). Names in ``optional`` may be
    absent from the file (weights tied to another entry). ``what`` names the model in messages.
    """
    path = header.path
    missing = sorted(set(expected) - set(header.tensors) - optional)
    unexpected = sorted(set(header.tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit {what}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, want in expected.items():  # in the model's order: the first layer first
        if name not in header.tensors:
            continue
        shape, dtype = header.tensors[name]
        if shape != tuple(want.shape):
            raise ValueError(
                f"{path}: {name} has shape {shape} but {what} expects {tuple(want.shape)}"
            )
        same_kind = (
            convert_floats
            and isinstance(dtype, torch.dtype)
            and dtype.is_floating_point
            and want.dtype.is_floating_point
        )
        if dtype != want.dtype and not same_kind:
            raise ValueError(f"{path}: {name} has dtype {dtype} but {what} expects {want.dtype}")
