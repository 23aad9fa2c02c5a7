"""Pictures of attention with matplotlib: a heatmap per head, translation alignments, rollout
over an image. Each function returns the `Figure` and, given ``path``, saves it (the suffix
picks the format: .png, .svg, .pdf).

The figures are built without pyplot, so nothing opens a window or touches global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .views import AttentionView

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_alignment", "plot_heads", "plot_rollout_overlay"]

Weights = Tensor | AttentionView


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is in the dev and apps extras
        raise ImportError("plots need matplotlib: pip install 'multihead[apps]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Figure, path: str | os.PathLike[str] | None, dpi: int) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)


def _view(weights: Weights, query_tokens: Sequence[str] | None, key_tokens: Sequence[str] | None):
    if isinstance(weights, AttentionView):
        return weights
    return AttentionView(weights, query_tokens, key_tokens)


def _label_size(cell_inch: float) -> float:
    """A font size (points) that fits one label per cell."""
    return float(min(9.0, max(4.5, cell_inch * 72 * 0.8)))


def _label_axes(
    ax: Axes, query: Sequence[str], key: Sequence[str], size: float, *, rows: bool, cols: bool
) -> None:
    ax.set_xticks(range(len(key)), key if cols else [], rotation=90, fontsize=size)
    ax.set_yticks(range(len(query)), query if rows else [], fontsize=size)
    ax.tick_params(length=0, pad=1)


def plot_heads(
    weights: Weights,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    mean: bool = True,
    ncols: int | None = None,
    cmap: str = "Blues",
    path: str | os.PathLike[str] | None = None,
    dpi: int = 110,
) -> Figure:
    """A grid of heatmaps, one per head (rows: queries, columns: keys), then their mean.

    ``weights`` is (heads, q_len, k_len), (1, heads, q_len, k_len), (q_len, k_len) or an
    `AttentionView`. Every panel has the tokens on both axes; the colour scale is shared
    (0 to the largest weight), so heads can be compared.
    """
    view = _view(weights, query_tokens, key_tokens)
    w = view.weights.numpy()
    panels = [(f"head {h}", w[h]) for h in range(view.num_heads)]
    if mean and view.num_heads > 1:
        panels.append(("mean of heads", w.mean(axis=0)))
    ncols = ncols or math.ceil(math.sqrt(len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    q_len, k_len = w.shape[1:]
    cell = min(0.3, max(0.08, 4.5 / max(q_len, k_len)))  # inches: ~4.5" panels for 40 tokens
    size = _label_size(cell)
    longest = max(len(t) for t in [*view.query_tokens, *view.key_tokens, "0"])
    margin = 0.3 + longest * size / 72 * 0.6
    figure = _figure(ncols * (k_len * cell + margin), nrows * (q_len * cell + margin) + 0.6)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    vmax = float(w.max()) if w.size and w.max() > 0 else 1.0
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_axis_off()
            continue
        name, data = panels[i]
        image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        _label_axes(ax, view.query_tokens, view.key_tokens, size, rows=True, cols=True)
        ax.set_title(name, fontsize=size + 2)
        if i % ncols == 0:
            ax.set_ylabel("query", fontsize=size + 1)
        if i // ncols == nrows - 1 or i + ncols >= len(panels):
            ax.set_xlabel("key", fontsize=size + 1)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    if title:
        figure.suptitle(title, fontsize=size + 4)
    _save(figure, path, dpi)
    return figure


def plot_alignment(
    weights: Weights,
    source_tokens: Sequence[str] | None = None,
    target_tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    cmap: str = "Greys",
    path: str | os.PathLike[str] | None = None,
    dpi: int = 130,
) -> Figure:
    """A translation's cross-attention as one matrix: source tokens across the top, target
    tokens down the side, darker = more attention (as in Bahdanau et al., 2015).

    ``weights`` is (target, source) or (heads, target, source) (averaged over heads), or an
    `AttentionView` of a cross-attention layer.
    """
    view = _view(weights, target_tokens, source_tokens)
    w = view.weights.numpy().mean(axis=0)
    t_len, s_len = w.shape
    cell = min(0.4, max(0.1, 6.0 / max(t_len, s_len)))
    size = _label_size(cell) + 1
    longest = max(len(t) for t in [*view.query_tokens, *view.key_tokens, "0"])
    margin = 0.6 + longest * size / 72 * 0.6
    figure = _figure(s_len * cell + margin + 1.0, t_len * cell + margin + 0.4)
    ax = figure.subplots()
    image = ax.imshow(w, cmap=cmap, vmin=0.0, vmax=max(float(w.max()), 1e-9), aspect="equal")
    _label_axes(ax, view.query_tokens, view.key_tokens, size, rows=True, cols=True)
    ax.xaxis.tick_top()
    ax.set_xticks(range(s_len), view.key_tokens, rotation=60, ha="left", fontsize=size)
    ax.set_xlabel("source", fontsize=size + 1)
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("target", fontsize=size + 1)
    figure.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    if title:
        figure.suptitle(title, fontsize=size + 2)
    _save(figure, path, dpi)
    return figure


def _image_array(image: Tensor | np.ndarray) -> np.ndarray:
    array = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) → (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W), (C, H, W) or (H, W, C), got {array.shape}")
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def plot_rollout_overlay(
    image: Tensor | np.ndarray,
    rollout_map: Tensor | np.ndarray,
    *,
    title: str | None = None,
    cmap: str = "inferno",
    alpha: float = 0.55,
    path: str | os.PathLike[str] | None = None,
    dpi: int = 130,
) -> Figure:
    """Three panels: the image, the class token's rollout over the patches, and the two
    overlaid (the rollout stretched over the image, each patch over its pixels).

    ``rollout_map`` is (grid_h, grid_w), e.g. from `image_rollout`.
    """
    pixels = _image_array(image)
    heat = torch.as_tensor(np.asarray(rollout_map, dtype=np.float32)).numpy()
    if heat.ndim != 2:
        raise ValueError(f"rollout_map must be (grid_h, grid_w), got shape {heat.shape}")
    height, width = pixels.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    gray = "gray" if pixels.ndim == 2 else None
    figure = _figure(9.0, 3.4)
    axes = figure.subplots(1, 3)
    axes[0].imshow(pixels, cmap=gray)
    axes[0].set_title("input")
    scale = {"cmap": cmap, "vmin": 0.0, "vmax": max(float(heat.max()), 1e-9), "extent": extent}
    shown = axes[1].imshow(heat, **scale)
    axes[1].set_title("class-token rollout")
    axes[2].imshow(pixels, cmap=gray)
    axes[2].imshow(heat, alpha=alpha, interpolation="bilinear", **scale)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.set_axis_off()
    figure.colorbar(shown, ax=axes, shrink=0.8, label="share (max = 1)")
    if title:
        figure.suptitle(title)
    _save(figure, path, dpi)
    return figure
