"""`multihead.explain_module`: one row per attention call of a model, with the kernel that
ran and the share of the scores it computed, checked against the masks' own densities."""

from __future__ import annotations

import pytest
import torch

import multihead
from multihead import masks
from multihead.kernels import online_softmax
from multihead.models import LMConfig, TransformerLM


@pytest.fixture(autouse=True)
def _default_tiles(monkeypatch):
    """The report is about real tile sizes, not the suite's tiny ones."""
    monkeypatch.setattr(online_softmax, "BLOCK_Q", 256)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 128)


def test_a_windowed_lm_reports_block_skipping_in_every_layer():
    torch.manual_seed(0)
    n, window = 4096, 256
    config = LMConfig.modern(
        50, d_model=32, num_heads=2, num_layers=2, dim_feedforward=64, max_len=n, window=window
    )
    model = TransformerLM(config).eval()
    ids = torch.randint(0, 50, (1, n))
    report = multihead.explain_module(model, ids)
    assert len(report) == config.num_layers
    density = masks.sliding_window(n, window=window).to_dense().float().mean().item()
    for row in report:
        assert row.shape == (1, 2, n, n)
        assert row.kernel == "tiled" and "block skipping" in row.explanation
        # at least the mask's own share; at most that plus the half tile on each edge
        assert density <= row.fraction <= density + 2 * 256 / n
    names = [row.layer for row in report]
    assert len(set(names)) == len(names) and all(
        "attn" in name or "attention" in name for name in names
    )
    assert "tiled" in str(report)


def test_a_short_causal_lm_runs_the_fused_causal_path():
    model = TransformerLM(LMConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=3)).eval()
    report = multihead.explain_module(model, torch.randint(0, 20, (2, 10)))
    assert [row.kernel for row in report] == ["sdpa"] * 3
    assert all("is_causal" in row.explanation for row in report)
    assert all(row.fraction == pytest.approx(11 / 20) for row in report)


def test_explain_module_leaves_no_hook_behind():
    model = TransformerLM(LMConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1)).eval()
    ids = torch.randint(0, 20, (1, 5))
    multihead.explain_module(model, ids)
    from multihead import functional

    assert functional.OBSERVERS == []
    assert all(not layer._forward_pre_hooks for layer in model.modules())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        multihead.explain_module(lambda x: x, ids)
