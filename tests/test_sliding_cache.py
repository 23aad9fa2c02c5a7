"""SlidingWindowKVCache: a fixed ring buffer, and decoding with it equals a sliding-window mask."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import multihead
from multihead import MultiHeadAttention, SlidingWindowKVCache, masks


def tokens(start: int, stop: int) -> Tensor:
    """Keys whose every entry is their absolute position: (1, 1, stop - start, 2)."""
    return torch.arange(start, stop, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, -1, 2)


def positions(keys: Tensor) -> list[int]:
    return keys[0, 0, :, 0].long().tolist()


def test_ring_buffer_returns_the_window_in_order_and_never_grows() -> None:
    cache = SlidingWindowKVCache(1, 1, 3, 2)
    pointer = cache.keys.data_ptr()
    seen = []
    for p in range(8):
        keys, values = cache.append(tokens(p, p + 1), tokens(p, p + 1))
        seen.append(positions(keys))
        assert positions(values) == positions(keys)
    # Each step sees itself and the window - 1 positions before it, oldest first.
    assert seen == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7]]
    assert cache.position == 8 and cache.length == 3 and cache.window == 3
    assert cache.keys.shape == (1, 1, 3, 2) and cache.keys.data_ptr() == pointer
    assert sorted(positions(cache.keys)) == [5, 6, 7]  # slot p % 3 holds position p


def test_chunks_longer_than_the_window() -> None:
    cache = SlidingWindowKVCache(1, 1, 3, 2)
    keys, _ = cache.append(tokens(0, 7), tokens(0, 7))  # a prompt: every key is returned
    assert positions(keys) == list(range(7)) and cache.position == 7
    keys, _ = cache.append(tokens(7, 9), tokens(7, 9))
    assert positions(keys) == [5, 6, 7, 8]  # window - 1 cached, then the 2 new ones
    keys, _ = cache.append(tokens(9, 10), tokens(9, 10))
    assert positions(keys) == [7, 8, 9]


def test_reorder_reset_and_bad_input() -> None:
    cache = SlidingWindowKVCache(3, 1, 2, 1)
    rows = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 3, 1)
    cache.append(rows, rows)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.keys[:, 0, :, 0].tolist() == [[2, 2], [2, 2], [0, 0]]
    cache.reset()
    assert cache.position == 0 and cache.length == 0
    with pytest.raises(ValueError, match="key has shape"):
        cache.append(torch.zeros(3, 2, 1, 1), torch.zeros(3, 2, 1, 1))
    with pytest.raises(ValueError, match="key has 2 positions but value has 1"):
        cache.append(torch.zeros(3, 1, 2, 1), torch.zeros(3, 1, 1, 1))
    with pytest.raises(ValueError, match="window must be a positive int"):
        SlidingWindowKVCache(1, 1, 0, 4)
    assert "window=2" in repr(cache)


@pytest.mark.parametrize("positions_kind", [None, "rope", "alibi", "relative"])
@pytest.mark.parametrize("steps", [[4, 1, 1, 1, 1, 1], [1] * 9, [2, 3, 1, 2, 1]])
def test_decoding_equals_a_sliding_window_mask(positions_kind, steps: list[int]) -> None:
    torch.manual_seed(0)
    window, total = 3, sum(steps)
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, positions=positions_kind).eval()
    x = torch.randn(2, total, 16)
    full = layer(x, mask=masks.sliding_window(total, total, window=window))
    cache = SlidingWindowKVCache(2, 2, window, 4)
    outputs, start = [], 0
    for n in steps:  # past wrap-around: total > window
        outputs.append(layer(x[:, start : start + n], causal=True, cache=cache))
        start += n
    torch.testing.assert_close(torch.cat(outputs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.position == total and cache.keys.shape[2] == window


def test_user_mask_is_combined_with_the_window() -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2).eval()
    x = torch.randn(1, 5, 8)
    cache = SlidingWindowKVCache(1, 2, 2, 4)
    layer(x[:, :3], cache=cache)
    keep = torch.tensor([[False, True]])  # the step sees 2 keys, oldest first: hide it
    out, weights = layer(x[:, 3:4], mask=keep, cache=cache, need_weights="per_head")
    assert weights.shape == (1, 2, 1, 2) and weights[..., 0].abs().max() == 0
    torch.testing.assert_close(weights[..., 1], torch.ones(1, 2, 1))
    with pytest.raises(ValueError, match="top-left"):
        layer(x[:, 4:5], causal="top-left", cache=cache)
    with pytest.raises(ValueError, match="mask has shape"):
        layer(x[:, 4:5], mask=torch.ones(1, 5, dtype=torch.bool), cache=cache)


def test_exported() -> None:
    assert multihead.SlidingWindowKVCache is SlidingWindowKVCache
