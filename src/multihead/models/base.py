"""Saving and loading models as safetensors weights plus a JSON config.

A directory holds ``config.json`` (the model's dataclass config) and ``model.safetensors``
(its state dict). No pickle is involved, so loading a directory someone sent you cannot run
their code. Shapes are checked against the config before anything is loaded, so a mismatch
names the tensor instead of failing deep inside ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PretrainedMixin"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="PretrainedMixin")


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
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"{path} has fields {unknown} that {cls.config_class.__name__} does not know"
            )
        return cls.config_class(**data)

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
        model = cls(config)  # type: ignore[call-arg]
        assert isinstance(model, nn.Module)
        expected = model.state_dict()
        state = {}
        with safe_open(str(weights), framework="pt", device=str(device)) as file:
            missing = sorted(set(expected) - set(file.keys()))
            unexpected = sorted(set(file.keys()) - set(expected))
            if missing or unexpected:
                raise ValueError(
                    f"{weights} does not fit {cls.__name__}({config}): "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            for name in expected:
                shape = tuple(file.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(
                        f"{weights}: {name} has shape {shape} but the config gives "
                        f"{tuple(expected[name].shape)}"
                    )
                state[name] = file.get_tensor(name)
        model.load_state_dict(state)
        return model.to(device).eval()
