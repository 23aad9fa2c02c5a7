"""What the pictures and the viewer show: one layer's weights with the tokens on both axes.

Also the file format of ``multihead show weights.safetensors``, for weights a user saved:

- one tensor per layer, named by the layer (any string), shape (heads, q_len, k_len)
  (a (q_len, k_len) map counts as one head; a leading batch of 1 is dropped), any float dtype;
- optional metadata (safetensors metadata is str → str; lists are JSON):
  ``tokens``: the queries of every layer and the keys of self-attention layers;
  ``source_tokens``: the keys of cross-attention layers (an encoder's input);
  ``<layer>.query_tokens`` and ``<layer>.key_tokens``: a layer's own; ``<layer>.kind``:
  "self" or "cross" (default: "cross" when the name contains "cross"); ``layers``: the
  display order (default: by name, numbers compared as numbers). Missing tokens are shown as
  their positions 0, 1, 2, ...

`save_attention` writes this format and `load_attention` reads it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor

Kind = Literal["self", "cross"]

__all__ = ["AttentionView", "as_views", "load_attention", "save_attention", "views_from_capture"]


def _tokens(name: str, tokens: Sequence[str] | None, n: int) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(n)]
    if isinstance(tokens, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    if len(tokens) != n:
        raise ValueError(f"{name} has {len(tokens)} tokens but the weights have {n} positions")
    return [str(t) for t in tokens]


@dataclass
class AttentionView:
    """One layer's weights (heads, q_len, k_len) in float32 on the CPU, and its tokens.

    Built from weights of shape (heads, q, k), (q, k) (one head) or (1, heads, q, k) (a
    captured batch of one); pass ``weights[i]`` to show example i of a batch.
    """

    weights: Tensor
    query_tokens: list[str]
    key_tokens: list[str]
    kind: Kind = "self"

    def __init__(
        self,
        weights: Tensor,
        query_tokens: Sequence[str] | None = None,
        key_tokens: Sequence[str] | None = None,
        kind: Kind = "self",
    ) -> None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
        if not weights.dtype.is_floating_point:
            raise TypeError(f"weights must be floating point, got {weights.dtype}")
        if weights.ndim == 4 and weights.shape[0] == 1:
            weights = weights[0]
        elif weights.ndim == 2:
            weights = weights.unsqueeze(0)
        if weights.ndim != 3:
            raise ValueError(
                "weights must be (heads, q_len, k_len), (q_len, k_len) or (1, heads, q_len, "
                f"k_len); got shape {tuple(weights.shape)} (pick one example: weights[i])"
            )
        if kind not in ("self", "cross"):
            raise ValueError(f"kind must be 'self' or 'cross', got {kind!r}")
        _, q_len, k_len = weights.shape
        self.weights = weights.detach().float().cpu().contiguous()
        self.query_tokens = _tokens("query_tokens", query_tokens, q_len)
        if key_tokens is None and kind == "self" and q_len == k_len:
            key_tokens = query_tokens  # self-attention: the same tokens on both axes
        self.key_tokens = _tokens("key_tokens", key_tokens, k_len)
        self.kind = kind

    @property
    def num_heads(self) -> int:
        """How many heads the weights hold (their first dimension)."""
        return self.weights.shape[0]


def _guess_kind(name: str) -> Kind:
    return "cross" if "cross" in name else "self"


def as_views(
    layers: Mapping[str, Tensor | AttentionView], tokens: Sequence[str] | None = None
) -> dict[str, AttentionView]:
    """Views for ``layers``; a bare tensor gets ``tokens`` on both axes (or key positions)."""
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping of layer name → weights")
    views = {}
    for name, layer in layers.items():
        if isinstance(layer, AttentionView):
            views[str(name)] = layer
            continue
        square = (
            isinstance(layer, Tensor) and layer.ndim >= 2 and layer.shape[-1] == layer.shape[-2]
        )
        views[str(name)] = AttentionView(
            layer, tokens, tokens if square else None, _guess_kind(name)
        )
    return views


def views_from_capture(
    captured: Mapping[str, Tensor],
    tokens: Sequence[str],
    *,
    source_tokens: Sequence[str] | None = None,
    output_tokens: Sequence[str] | None = None,
    index: int = 0,
) -> dict[str, AttentionView]:
    """Views of example ``index`` of a `capture_attention` result.

    For an encoder-decoder, ``tokens`` are the decoder's input tokens and ``source_tokens``
    the encoder's: layers named ``encoder.*`` show source × source, ``*cross*`` layers show
    ``output_tokens`` (what each decoder position produced; default ``tokens``) × source,
    the rest ``tokens`` × ``tokens``. A decoder-only or encoder-only model needs ``tokens``.
    """
    views = {}
    for name, weights in captured.items():
        w = weights[index]
        if "cross" in name:
            if source_tokens is None:
                raise ValueError(f"{name} is cross-attention: pass source_tokens")
            q = output_tokens if output_tokens is not None else tokens
            views[name] = AttentionView(w, q, source_tokens, "cross")
        elif name.startswith("encoder.") and source_tokens is not None:
            views[name] = AttentionView(w, source_tokens, source_tokens, "self")
        else:
            views[name] = AttentionView(w, tokens, tokens, "self")
    return views


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def save_attention(
    path: str | os.PathLike[str],
    layers: Mapping[str, Tensor | AttentionView],
    tokens: Sequence[str] | None = None,
) -> Path:
    """Write ``layers`` in the format ``multihead show FILE.safetensors`` reads."""
    from safetensors.torch import save_file

    views = as_views(layers, tokens)
    metadata = {"layers": json.dumps(list(views))}
    for name, view in views.items():
        metadata[f"{name}.query_tokens"] = json.dumps(view.query_tokens)
        metadata[f"{name}.key_tokens"] = json.dumps(view.key_tokens)
        metadata[f"{name}.kind"] = view.kind
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: view.weights for name, view in views.items()}, str(path), metadata)
    return path


def _json_list(metadata: Mapping[str, str], key: str, path: Path) -> list[str] | None:
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: metadata {key!r} is not JSON ({error})") from None
    if not isinstance(value, list):
        kind = type(value).__name__
        raise ValueError(f"{path}: metadata {key!r} must be a JSON list, got {kind}")
    return [str(v) for v in value]


def load_attention(path: str | os.PathLike[str]) -> dict[str, AttentionView]:
    """Read weights saved as described in this module's docstring."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file ({error})") from None
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    order = _json_list(metadata, "layers", path) or sorted(tensors, key=_natural_key)
    unknown = sorted(set(order) - set(tensors))
    if unknown:
        raise ValueError(f"{path}: metadata 'layers' names {unknown}, which are not tensors")
    order += sorted(set(tensors) - set(order), key=_natural_key)
    shared = _json_list(metadata, "tokens", path)
    source = _json_list(metadata, "source_tokens", path)
    views = {}
    for name in order:
        kind = metadata.get(f"{name}.kind", _guess_kind(name))
        if kind not in ("self", "cross"):
            raise ValueError(f"{path}: {name}.kind must be 'self' or 'cross', got {kind!r}")
        try:
            views[name] = AttentionView(
                tensors[name],
                _json_list(metadata, f"{name}.query_tokens", path) or shared,
                _json_list(metadata, f"{name}.key_tokens", path)
                or (source if kind == "cross" else shared),
                kind,  # type: ignore[arg-type]
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: layer {name!r}: {error}") from None
    return views
