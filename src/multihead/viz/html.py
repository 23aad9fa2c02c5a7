"""The attention viewer: one self-contained HTML file (data, script and style inline).

Nothing is fetched when the page opens (no CDN, no fonts, no network), so it works from a
file:// URL and can be mailed or attached as it is. The page lets a person pick the kind
(self / cross), the layer and the head, and hover a query token to see where it attends.
The weights travel as base64 float32, exact and about a third smaller than JSON numbers.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from torch import Tensor

from .views import AttentionView, as_views

__all__ = ["render_html", "write_html"]

TEMPLATE = "viewer.html"


def _layer_data(name: str, view: AttentionView) -> dict[str, object]:
    raw = view.weights.numpy().astype("<f4").tobytes()
    return {
        "name": name,
        "kind": view.kind,
        "heads": view.num_heads,
        "query_tokens": view.query_tokens,
        "key_tokens": view.key_tokens,
        "weights": base64.b64encode(raw).decode("ascii"),
    }


def render_html(
    layers: Mapping[str, Tensor | AttentionView],
    tokens: Sequence[str] | None = None,
    *,
    title: str = "attention",
) -> str:
    """The viewer page for ``layers`` (see `write_html`) as a string."""
    views = as_views(layers, tokens)
    payload = {"title": title, "layers": [_layer_data(n, v) for n, v in views.items()]}
    # "<" escaped, so no token can close the <script> element that carries the data.
    data = json.dumps(payload, ensure_ascii=False).replace("<", "\\u003c")
    page = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return page.replace("{{TITLE}}", html.escape(title)).replace("{{DATA}}", data)


def write_html(
    path: str | os.PathLike[str],
    layers: Mapping[str, Tensor | AttentionView],
    tokens: Sequence[str] | None = None,
    *,
    title: str = "attention",
) -> Path:
    """Write the viewer for ``layers`` to ``path`` and return the path.

    ``layers`` maps a layer name to its weights: a tensor (heads, q_len, k_len) shown with
    ``tokens`` on both axes (a name containing "cross" is listed as cross-attention), or an
    `AttentionView` that carries its own tokens and kind (see `views_from_capture`).
    Layers appear in the order given.
    """
    path = Path(path)
    page = render_html(layers, tokens, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
