"""Saving and loading models as safetensors weights plus a JSON config.

A directory holds ``config.json`` (the model's dataclass config) and ``model.safetensors``
(its state dict). No pickle is involved, so loading a directory someone sent you cannot run
their code. Before anything is allocated the config is validated (its dataclass checks every
field), the model is built on the ``meta`` device (shapes, no memory) and compared with the
weights file's header: names, shapes and dtypes must fit, so a mismatch names the tensor
instead of failing deep inside ``load_state_dict``, and a config with absurd sizes is refused
instead of exhausting memory (the weights it needs must be in the file, and what the model
rebuilds from the config alone, such as position tables, is capped at `MAX_REBUILT_BYTES`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..multi_head_attention import check_like_weights
from ..safe_files import Header, check_against, read_header

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "check_input",
    "check_token_ids",
    "validate_token_ids",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
# Buffers a model builds from its config alone (not stored in the weights file).
MAX_REBUILT_BYTES = 1 << 28

M = TypeVar("M", bound="PretrainedMixin")

_VALIDATE_IDS: ContextVar[bool] = ContextVar("validate_token_ids", default=True)


@contextmanager
def validate_token_ids(enabled: bool) -> Iterator[None]:
    """Within the block, models check the range of their token ids (True, the default
    outside any block) or skip it (False: no host sync per forward, for a hot GPU loop
    whose ids are known good; a bad id then fails inside the embedding instead)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    token = _VALIDATE_IDS.set(enabled)
    try:
        yield
    finally:
        _VALIDATE_IDS.reset(token)


def check_token_ids(
    name: str,
    ids: object,
    vocab_size: int,
    weight: torch.Tensor,
    *,
    validate: bool | None = None,
) -> torch.Tensor:
    """Token ids must be an integer (batch, seq) tensor of ids < vocab_size beside ``weight``.

    Type, shape and device are checked always (they cost nothing). The range of the ids
    needs their min and max on the host, a device sync that also breaks
    ``torch.compile(fullgraph=True)``: ``validate`` None (default) checks it except while
    torch.compile traces or inside ``validate_token_ids(False)``; False never, True always.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq), got shape {tuple(ids.shape)}")
    if ids.device != weight.device:
        raise ValueError(f"{name} is on {ids.device} but the model is on {weight.device}")
    if validate is None:
        # is_compiling first: torch.compile never traces the ContextVar.
        validate = not torch.compiler.is_compiling() and _VALIDATE_IDS.get()
    if validate and ids.numel():
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} has ids in [{low}, {high}] but vocab_size is {vocab_size}")
    return ids


def check_input(name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A float input must have the dtype and device of the model's ``weight`` (no silent casts)."""
    check_like_weights(name, x, weight, owner="model")
    return x


class PretrainedMixin:
    """For an ``nn.Module`` built as ``Model(config)`` from a dataclass ``config_class``."""

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors into ``directory`` (created if needed)."""
        assert isinstance(self, nn.Module)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.config)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def load_config(cls, directory: str | Path) -> Any:
        """The config saved in ``directory``, as ``config_class``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is it a saved model?")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is {path.stat().st_size} bytes: too big for a config")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"{path} has fields {unknown} that {cls.config_class.__name__} does not know"
            )
        try:
            return cls.config_class(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def _check_fits(cls, config: Any, header: Header) -> None:
        """Refuse weights that do not fit ``config``, before any memory is allocated."""
        # Every layer has weights: a layer count beyond the file's tensor count is absurd
        # (and building that many layers, even without memory, would take forever).
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if (
                field.name.endswith("layers")
                and isinstance(value, int)
                and value > len(header.tensors)
            ):
                raise ValueError(
                    f"{CONFIG_NAME} says {field.name}={value} but {header.path} holds only "
                    f"{len(header.tensors)} tensors"
                )
        with torch.device("meta"):
            skeleton = cls(config)  # type: ignore[call-arg]
        assert isinstance(skeleton, nn.Module)
        what = f"{cls.__name__}({config})"
        check_against(header, skeleton.state_dict(), what=what, convert_floats=True)
        saved = {id(t) for t in skeleton.state_dict(keep_vars=True).values()}
        rebuilt = sum(
            t.numel() * t.element_size()
            for t in {id(t): t for t in [*skeleton.parameters(), *skeleton.buffers()]}.values()
            if id(t) not in saved
        )
        if rebuilt > MAX_REBUILT_BYTES:
            raise ValueError(
                f"{CONFIG_NAME} in {header.path.parent} asks for {rebuilt / 2**30:.1f} GiB of "
                f"buffers beyond the weights file (limit {MAX_REBUILT_BYTES / 2**30:.2f} GiB): "
                "check sizes such as max_len"
            )

    @classmethod
    def from_pretrained(
        cls: type[M], directory: str | Path, *, device: torch.device | str = "cpu"
    ) -> M:
        """Build the model from ``directory``'s config and load its weights (in eval mode)."""
        directory = Path(directory)
        config = cls.load_config(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}: is it a saved model?")
        cls._check_fits(config, read_header(weights))
        model = cls(config)  # type: ignore[call-arg]
        assert isinstance(model, nn.Module)
        with safe_open(str(weights), framework="pt", device=str(device)) as file:
            state = {name: file.get_tensor(name) for name in model.state_dict()}
        model.load_state_dict(state)
        return model.to(device).eval()
