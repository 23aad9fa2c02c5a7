"""KV caches: the buffer itself, and attention with a cache equals attention without one."""

import pytest
import torch

from multihead import CrossAttentionCache, KVCache, MultiHeadAttention, SlidingWindowKVCache
from multihead.cache import AttentionCache, NoCache
from multihead.models import Seq2SeqConfig, Seq2SeqTransformer


def test_append_writes_in_place_and_returns_views() -> None:
    cache = KVCache(2, 3, 5, 4)
    k1, v1 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    keys, values = cache.append(k1, v1)
    assert cache.length == 2 and keys.shape == (2, 3, 2, 4)
    assert keys.data_ptr() == cache.keys.data_ptr()  # a view of the buffer, no copy
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    keys, values = cache.append(k2, v2)
    torch.testing.assert_close(keys, torch.cat([k1, k2], 2))
    torch.testing.assert_close(values, torch.cat([v1, v2], 2))


def test_overflow_and_bad_shapes_raise() -> None:
    cache = KVCache(1, 2, 3, 4)
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="overflow.*max_len=3"):
        cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert cache.length == 3  # nothing was written
    with pytest.raises(ValueError, match="key has shape"):
        KVCache(1, 2, 3, 4).append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    with pytest.raises(ValueError, match="max_len"):
        KVCache(1, 2, 0, 4)


def test_reorder_moves_rows() -> None:
    cache = KVCache(3, 1, 4, 2)
    keys = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    cache.append(keys, keys)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.keys[:, 0, :2, 0].tolist() == [[2, 2], [2, 2], [0, 0]]
    with pytest.raises(ValueError, match="beam_indices"):
        cache.reorder(torch.tensor([0, 1]))


@pytest.mark.parametrize("num_kv_heads, qk_norm", [(4, False), (2, True)])
def test_self_attention_with_cache_equals_full_causal(num_kv_heads: int, qk_norm: bool) -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, qk_norm=qk_norm).eval()
    x = torch.randn(2, 6, 16)
    full = attn(x, causal=True)
    cache = KVCache(2, num_kv_heads, 6, 4)
    steps = [attn(x[:, :3], causal=True, cache=cache)]  # a prompt, then one token at a time
    steps += [attn(x[:, i : i + 1], causal=True, cache=cache) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        attn(x[:, :1], causal=True, cache=cache)
    with pytest.raises(ValueError, match="top-left"):
        attn(x[:, :1], causal="top-left", cache=KVCache(2, num_kv_heads, 6, 4))
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, x[:, :2], cache=KVCache(2, num_kv_heads, 6, 4))


def test_cross_attention_cache_projects_the_memory_once() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4).eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([True] * 5 + [True] * 3 + [False] * 2).view(2, 1, 1, 5).expand(2, 1, 3, 5)
    expected = attn(x, memory, mask=mask)
    cache = CrossAttentionCache()
    torch.testing.assert_close(attn(x, memory, mask=mask, cache=cache), expected)
    stored = cache.keys
    torch.testing.assert_close(attn(x, None, mask=mask, cache=cache), expected)  # no memory
    assert cache.keys is stored
    with pytest.raises(ValueError, match="batch size"):
        attn(x[:1], cache=cache)
    with pytest.raises(ValueError, match="needs key"):
        attn(x, cache=CrossAttentionCache())


def test_model_caches_hold_one_entry_per_layer() -> None:
    config = Seq2SeqConfig(vocab_size=10, d_model=16, num_heads=2, num_decoder_layers=3)
    model = Seq2SeqTransformer(config)
    self_caches, cross_caches = model.new_caches(2, 5, model.embedding.weight)
    assert len(self_caches) == len(cross_caches) == 3
    assert self_caches[0].keys.shape == (2, 2, 5, 8)


def test_every_cache_implements_the_interface() -> None:
    for cache in (KVCache(1, 1, 2, 2), SlidingWindowKVCache(1, 1, 2, 2), CrossAttentionCache()):
        assert isinstance(cache, AttentionCache)
    assert isinstance(NoCache(), AttentionCache)
    x = torch.zeros(1, 2, 4)
    assert NoCache().prepare(x, None, None, True) == (x, x, True)
    assert KVCache(1, 1, 2, 2).prepare(x, None, None, True) == (x, x, "bottom-right")
    memory = x[:, :1]
    key, value, causal = CrossAttentionCache().prepare(x, memory, None, False)
    assert key is memory and value is memory and causal is False


def test_sliding_cache_picks_the_key_order() -> None:
    def step(cache: SlidingWindowKVCache, p: int, **readers) -> list[int]:
        keys, values = cache.update(tokens(p), tokens(p), **readers)
        assert torch.equal(keys, values)
        return keys[0, 0, :, 0].long().tolist()

    cache = SlidingWindowKVCache(1, 1, 3, 2)
    for p in range(4):
        step(cache, p)
    # Nothing reads keys by their place: the buffer as it lies (slot p % 3), no copy.
    keys, _ = cache.update(tokens(4), tokens(4))
    assert keys[0, 0, :, 0].tolist() == [3, 4, 2] and keys.data_ptr() == cache.keys.data_ptr()
    # A mask, a position bias or weights handed back read them: oldest first.
    assert step(cache, 5, mask=torch.ones(1, 3, dtype=torch.bool)) == [3, 4, 5]
    assert step(cache, 6, position_bias=True) == [4, 5, 6]
    assert step(cache, 7, weights=True) == [5, 6, 7]
    assert cache.mask(1, 3) is None and cache.mask(2, 4) is not None


def tokens(p: int) -> torch.Tensor:
    """One key/value whose entries are its position p: (1, 1, 1, 2)."""
    return torch.full((1, 1, 1, 2), float(p))


class CountingCache:
    """A cache of one's own: a KVCache that counts its updates. The layer takes any
    `AttentionCache`."""

    def __init__(self, inner: KVCache) -> None:
        self.inner, self.updates = inner, 0
        self.offset_seen: list[int] = []

    @property
    def offset(self) -> int:
        return self.inner.offset

    def prepare(self, query, key, value, causal):
        return self.inner.prepare(query, key, value, causal)

    def update(self, key, value, **readers):
        self.updates += 1
        self.offset_seen.append(self.inner.offset)
        return self.inner.update(key, value, **readers)

    def mask(self, q_len: int, k_len: int):
        return self.inner.mask(q_len, k_len)


def test_the_layer_takes_any_attention_cache() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, num_kv_heads=2, positions="rope").eval()
    x = torch.randn(2, 5, 16)
    cache = CountingCache(KVCache(2, 2, 5, 4))
    assert isinstance(cache, AttentionCache)
    steps = [attn(x[:, :3], causal=True, cache=cache)]
    steps += [attn(x[:, i : i + 1], causal=True, cache=cache) for i in (3, 4)]
    torch.testing.assert_close(torch.cat(steps, 1), attn(x, causal=True), atol=1e-5, rtol=1e-5)
    assert cache.updates == 3 and cache.offset_seen == [0, 3, 4]
