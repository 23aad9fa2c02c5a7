"""See what attention does: per-head heatmaps, attention rollout, cross-attention alignment,
an HTML viewer, and capturing every layer's weights from a model in one call.

    with capture_attention(model) as captured:
        model(src_ids, tgt_ids)
    write_html("attention.html", views_from_capture(captured, tgt_tokens, source_tokens=src))

Plots need matplotlib (the ``apps`` or ``dev`` extra); the rest needs only torch.
"""

from .capture import CapturedAttention, capture_attention
from .heatmaps import plot_alignment, plot_heads, plot_rollout_overlay
from .html import render_html, write_html
from .rollout import image_rollout, rollout
from .views import AttentionView, as_views, load_attention, save_attention, views_from_capture

__all__ = [
    "AttentionView",
    "CapturedAttention",
    "as_views",
    "capture_attention",
    "image_rollout",
    "load_attention",
    "plot_alignment",
    "plot_heads",
    "plot_rollout_overlay",
    "render_html",
    "rollout",
    "save_attention",
    "views_from_capture",
    "write_html",
]
