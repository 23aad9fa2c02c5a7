"""`multihead` as a Hugging Face attention implementation, checked against transformers' eager.

Tiny models are built from configs in code with random weights (nothing is downloaded); the
"multihead" model loads the eager model's state_dict, so any difference is the attention.
Outputs are compared at the positions the padding mask keeps: a padded query with no visible
key gets 0 here but a uniform average in eager, and no kept position ever sees it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

import multihead.integrations.huggingface as hf_attention
from multihead import masks
from multihead.integrations.huggingface import attention_forward, register

REASON = "needs transformers: pip install -e '.[hf]' (make setup installs it)"
FP32 = {"atol": 1e-5, "rtol": 1e-5}
VOCAB = 64


@pytest.fixture(scope="module")
def transformers():
    """The transformers module (every test needing it skips without it), registered once."""
    module = pytest.importorskip("transformers", reason=REASON)
    register()
    register("multihead-reference", kernel="reference")
    register("multihead-tiled", kernel="tiled")
    return module


def llama_config(transformers):
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
        max_position_embeddings=64,
    )


def gpt2_config(transformers):
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # training mode stays deterministic
    )  # fmt: skip


def bert_config(transformers):
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,  # training mode stays deterministic
        attention_probs_dropout_prob=0.0,
    )


def gemma2_config(transformers, softcap: float | None = 2.0):
    return transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=4,  # layer 0 slides over 4 keys, layer 1 sees all
        attn_logit_softcapping=softcap,  # with large weights, so the cap bends the scores
        initializer_range=0.5,
        query_pre_attn_scalar=8,
    )


def mistral_config(transformers, window: int = 4):
    """Llama's shape with every layer sliding over ``window`` keys (shorter than the inputs)."""
    return transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=window,
    )


CAUSAL_LMS = {
    "llama": llama_config,
    "gpt2": gpt2_config,
    "gemma2": gemma2_config,
    "mistral": mistral_config,
}


def twin_models(
    auto_class, config, implementation: str = "multihead", seed: int = 0, theirs: str = "eager"
):
    """(their model (eager unless said), same weights with ``implementation``), in eval mode.

    Each gets its own copy of the config: from_config writes the implementation into the
    config it is given, so a shared one would switch the other model too.
    """
    torch.manual_seed(seed)
    eager = auto_class.from_config(copy.deepcopy(config), attn_implementation=theirs)
    ours = auto_class.from_config(copy.deepcopy(config), attn_implementation=implementation)
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == implementation
    assert eager.config._attn_implementation == theirs
    return eager.eval(), ours.eval()


def padded_batch(side: str, lengths=(9, 6, 3), seq: int = 9) -> tuple[Tensor, Tensor]:
    """Token ids and a 0/1 attention_mask with ``side`` ("left"/"right") padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(lengths), seq), generator=generator)
    keep = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            keep[row, seq - n :] = 1
        else:
            keep[row, :n] = 1
    return ids, keep


def assert_close_where(actual: Tensor, expected: Tensor, keep: Tensor) -> None:
    torch.testing.assert_close(actual[keep.bool()], expected[keep.bool()], **FP32)


# -- models against eager -------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_gqa_logits_match_eager(transformers, side, monkeypatch):
    eager, ours = twin_models(transformers.AutoModelForCausalLM, llama_config(transformers))
    ids, keep = padded_batch(side)
    sdpa_mask = transformers.masking_utils.sdpa_mask
    seen = []

    def spy(query, key, value, **kwargs):
        seen.append((query.shape[1], key.shape[1], kwargs["mask"]))
        return attention(query, key, value, **kwargs)

    attention = hf_attention.attention
    monkeypatch.setattr(hf_attention, "attention", spy)
    with torch.no_grad():
        expected = eager(ids, attention_mask=keep).logits
        actual = ours(ids, attention_mask=keep).logits
    assert_close_where(actual, expected, keep)
    # GQA without copies: 4 query heads, 2 key/value heads reach multihead.attention.
    assert [(q, k) for q, k, _ in seen] == [(4, 2), (4, 2)]
    # The padding mask arrives as one structured Mask, causal part included, shared by both
    # layers (built once per forward), equal to the boolean mask transformers' sdpa builds.
    first, second = (mask for *_, mask in seen)
    assert isinstance(first, masks.Mask) and first is second
    assert (first.q_len, first.k_len, first.batch) == (9, 9, 3)
    expected_mask = sdpa_mask(batch_size=3, q_length=9, kv_length=9, attention_mask=keep.bool())
    assert torch.equal(first.to_dense().expand(3, 1, 9, 9), expected_mask)


def test_llama_without_padding_takes_the_causal_fast_path(transformers, monkeypatch):
    eager, ours = twin_models(transformers.AutoModelForCausalLM, llama_config(transformers))
    ids, _ = padded_batch("right", lengths=(9, 9))
    seen = []

    def spy(query, key, value, **kwargs):
        seen.append((kwargs["mask"], kwargs["causal"]))
        return attention(query, key, value, **kwargs)

    attention = hf_attention.attention
    monkeypatch.setattr(hf_attention, "attention", spy)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, **FP32)
    assert seen == [(None, True), (None, True)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt2_logits_match_eager(transformers, side):
    eager, ours = twin_models(transformers.AutoModelForCausalLM, gpt2_config(transformers))
    ids, keep = padded_batch(side)
    with torch.no_grad():
        expected = eager(ids, attention_mask=keep).logits
        actual = ours(ids, attention_mask=keep).logits
    assert_close_where(actual, expected, keep)


def test_bert_encoder_with_padding_matches_eager(transformers):
    eager, ours = twin_models(transformers.AutoModelForMaskedLM, bert_config(transformers))
    ids, keep = padded_batch("right")
    with torch.no_grad():
        expected = eager(ids, attention_mask=keep, output_hidden_states=True)
        actual = ours(ids, attention_mask=keep, output_hidden_states=True)
    # Bidirectional: every query, padded or not, sees the kept keys, so all positions agree.
    torch.testing.assert_close(actual.logits, expected.logits, **FP32)
    torch.testing.assert_close(actual.hidden_states[-1], expected.hidden_states[-1], **FP32)


def test_gemma2_softcap_and_sliding_window_match_eager(transformers, monkeypatch):
    """With the cap and without it ours matches eager; the same weights give other logits
    without it, so the cap reached the kernel and changed the scores."""
    ids, keep = padded_batch("left")
    softcaps = []

    def spy(query, key, value, **kwargs):
        softcaps.append(kwargs["softcap"])
        return attention(query, key, value, **kwargs)

    attention = hf_attention.attention
    monkeypatch.setattr(hf_attention, "attention", spy)
    logits, weights = {}, {}
    for softcap in (2.0, None):
        eager, ours = twin_models(
            transformers.AutoModelForCausalLM, gemma2_config(transformers, softcap)
        )
        with torch.no_grad():
            expected = eager(ids, attention_mask=keep).logits
            logits[softcap] = ours(ids, attention_mask=keep).logits
        assert_close_where(logits[softcap], expected, keep)
        weights[softcap] = ours.state_dict()
    assert softcaps == [2.0, 2.0, None, None]  # one call per layer, the cap passed on
    # Same weights, other logits: the cap took effect (by far more than the tolerance).
    assert all(torch.equal(weights[2.0][k], w) for k, w in weights[None].items())
    rows = keep.bool()
    assert (logits[2.0][rows] - logits[None][rows]).abs().max() > 0.1


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_generate_with_kv_cache_gives_eager_tokens(transformers, name):
    config = CAUSAL_LMS[name](transformers)
    # Tied embeddings at random init make every step echo its input token, whatever the
    # attention computes (GPT-2, Gemma 2): untied, the tokens depend on it.
    config.tie_word_embeddings = False
    eager, ours = twin_models(transformers.AutoModelForCausalLM, config)
    ids, keep = padded_batch("left", lengths=(6, 4), seq=6)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    expected = eager.generate(ids, attention_mask=keep, **settings)
    actual = ours.generate(ids, attention_mask=keep, **settings)
    assert expected.shape == (2, 6 + 5)
    assert all(len(set(row)) > 1 for row in expected[:, 6:].tolist())  # no token echoed
    assert torch.equal(actual, expected)


def assert_same_gradients(eager: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Every parameter's gradient, by name; each must be there and not all zero."""
    for (name, expected), actual in zip(eager.named_parameters(), ours.parameters(), strict=True):
        if expected.grad is None:  # e.g. a pooler the loss does not use
            assert actual.grad is None, name
            continue
        torch.testing.assert_close(actual.grad, expected.grad, **FP32, msg=name)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in ours.parameters())


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_causal_lm_gradients_match_eager(transformers, name):
    config = CAUSAL_LMS[name](transformers)
    eager, ours = twin_models(transformers.AutoModelForCausalLM, config)
    ids, keep = padded_batch("left")
    # Position t predicts label t+1: keep only labels whose predicting position is kept.
    labels = ids.masked_fill(keep == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(keep[:, :-1] == 0, -100)
    for model in (eager, ours):
        model.train()
        model(ids, attention_mask=keep, labels=labels).loss.backward()
    assert_same_gradients(eager, ours)


def test_bert_gradients_match_eager(transformers):
    eager, ours = twin_models(transformers.AutoModelForMaskedLM, bert_config(transformers))
    ids, keep = padded_batch("right")
    labels = ids.masked_fill(keep == 0, -100)  # predict every kept token
    for model in (eager, ours):
        model.train()
        model(ids, attention_mask=keep, labels=labels).loss.backward()
    assert_same_gradients(eager, ours)


def test_output_attentions_returns_the_weights(transformers):
    eager, ours = twin_models(transformers.AutoModelForCausalLM, llama_config(transformers))
    ids, keep = padded_batch("right")
    with torch.no_grad():
        expected = eager(ids, attention_mask=keep, output_attentions=True).attentions
        actual = ours(ids, attention_mask=keep, output_attentions=True).attentions
    rows = keep.bool()[:, None, :, None].expand_as(expected[0])  # kept query rows
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a[rows], e[rows], **FP32)


@pytest.mark.parametrize("kernel", ["reference", "tiled"])
def test_chosen_kernel_runs_and_matches_eager(transformers, kernel, monkeypatch):
    from multihead import kernels

    eager, ours = twin_models(
        transformers.AutoModelForCausalLM, llama_config(transformers), f"multihead-{kernel}"
    )
    calls = []
    module = kernels.KERNELS[kernel]
    forward = module.forward
    monkeypatch.setattr(module, "forward", lambda request: calls.append(1) or forward(request))
    ids, keep = padded_batch("left")
    with torch.no_grad():
        expected = eager(ids, attention_mask=keep).logits
        actual = ours(ids, attention_mask=keep).logits
    assert_close_where(actual, expected, keep)
    assert len(calls) == 2  # one call per layer, on the chosen kernel


# -- structured masks: block skipping, against transformers' sdpa ---------------------------

SDPA_MODELS = {"llama": llama_config, "mistral": mistral_config}


def _probe(*_):  # a mask function transformers does not build: evaluated, not recognised
    return lambda b, h, q, k: (q + k) % 3 != 1


def _mask_functions(utils, batch: int) -> dict[str, tuple[object, bool]]:
    """name: (transformers mask function, whether it has an analytic Mask)."""
    zeros = torch.zeros(batch, dtype=torch.long)
    return {
        "causal": (utils.causal_mask_function, True),
        "window": (utils.sliding_window_causal_mask_function(3), True),
        "wide window": (utils.sliding_window_causal_mask_function(64), True),
        "bidirectional": (utils.bidirectional_mask_function, True),
        "chunked": (utils.chunked_causal_mask_function(4, zeros), True),
        "chunked, shifted": (utils.chunked_causal_mask_function(4, zeros + 1), True),
        "chunked, ragged": (utils.chunked_causal_mask_function(4, torch.arange(batch)), False),
        "causal & custom": (utils.and_masks(utils.causal_mask_function, _probe()), False),
        "causal | custom": (utils.or_masks(utils.causal_mask_function, _probe()), False),
        "window overlay alone": (utils.sliding_window_overlay(3), False),
    }


def _paddings(batch: int, keys: int) -> dict[str, Tensor | None]:
    """2-D attention masks over ``keys`` positions (True = a real token)."""
    left = torch.ones(batch, keys, dtype=torch.bool)
    left[0, :2] = False
    right = torch.ones(batch, keys, dtype=torch.bool)
    right[-1, keys - 3 :] = False
    holes = torch.rand(batch, keys, generator=torch.Generator().manual_seed(5)) > 0.3
    holes[:, -1] = True
    return {
        "none": None,
        "left": left,
        "right": right,
        "both": left & right,
        "holes": holes,
        "short": torch.ones(batch, keys - 2, dtype=torch.bool),  # a static cache's tail
    }


# (batch, q_length, kv_length, q_offset, kv_offset): prefill; one decoding step; a chunk of
# 3 after a cache; a sliding cache (keys from 3 on); a static cache (keys past the queries);
# a longer prefill, so that tiles of 4 fall inside, outside and across the band
MASK_SIZES = [(2, 9, 9, 0, 0), (3, 1, 12, 11, 0), (2, 3, 12, 9, 0), (2, 2, 7, 8, 3),
              (2, 4, 20, 5, 0), (2, 21, 21, 0, 0)]  # fmt: skip


@pytest.mark.parametrize("size", MASK_SIZES, ids=str)
def test_structured_mask_is_transformers_sdpa_mask(transformers, size):
    """Every mask function transformers builds, with every padding, at every offset: the
    Mask equals sdpa_mask's tensor, its block structure is that of the tensor, and the kinds
    that have an analytic Mask get one (the rest is evaluated from the function)."""
    utils = transformers.masking_utils
    batch, q_len, k_len, q_offset, kv_offset = size
    sizes = {"batch_size": batch, "q_length": q_len, "kv_length": k_len}
    sizes |= {"q_offset": q_offset, "kv_offset": kv_offset}
    for name, (function, analytic) in _mask_functions(utils, batch).items():
        for side, keep in _paddings(batch, kv_offset + k_len).items():
            what = f"{name}, {side} padding"
            args = sizes | {"mask_function": function, "attention_mask": keep}
            expected = utils.sdpa_mask(**args, allow_is_causal_skip=False)
            expected = expected.expand(batch, 1, q_len, k_len)
            ours = hf_attention.structured_mask(**args, allow_is_causal_skip=False)
            assert isinstance(ours, masks.Mask), what
            assert torch.equal(ours.to_dense().expand(batch, 1, q_len, k_len), expected), what
            for block in ((4, 4), (2, 3)):
                structure = masks.classify(expected, *block)
                got = ours.block_structure(*block).expand_as(structure)
                assert torch.equal(got, structure), f"{what}, tiles {block}"
            assert ("mask_function" in ours.name) != analytic, what
            # Where sdpa needs no mask, neither do we (the causal fast path, or all seen).
            skip = utils.sdpa_mask(**args) is None
            assert (hf_attention.structured_mask(**args) is None) <= skip, what


@pytest.mark.parametrize("name", sorted(SDPA_MODELS))
@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("implementation", ["multihead", "multihead-tiled"])
def test_logits_match_sdpa_with_one_shared_mask(
    transformers, name, side, implementation, monkeypatch
):
    """Llama (causal) and Mistral (a window of 4 over 12 tokens), padded or not, equal
    transformers' sdpa; the layers share one Mask, and with tiles of 4 the tiled kernel
    visits only the tiles the mask leaves (fewer than all)."""
    from multihead.kernels import online_softmax

    monkeypatch.setattr(online_softmax, "BLOCK_Q", 4)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 4)
    config = SDPA_MODELS[name](transformers)
    sdpa, ours = twin_models(
        transformers.AutoModelForCausalLM, config, implementation, theirs="sdpa"
    )
    lengths = (12, 12) if side == "none" else (12, 8)
    ids, keep = padded_batch("right" if side == "none" else side, lengths, seq=12)
    seen, visited = [], []

    def spy(query, key, value, **kwargs):
        seen.append(kwargs["mask"])
        return attention(query, key, value, **kwargs)

    tile_forward = online_softmax.tile_forward

    def counting(tile):
        visited.append(tile.q.shape[2] * tile.k.shape[2])
        return tile_forward(tile)

    attention = hf_attention.attention
    monkeypatch.setattr(hf_attention, "attention", spy)
    monkeypatch.setattr(online_softmax, "tile_forward", counting)
    with torch.no_grad():
        expected = sdpa(ids, attention_mask=keep).logits
        actual = ours(ids, attention_mask=keep).logits
    assert_close_where(actual, expected, keep)
    assert len(seen) == 2 and seen[0] is seen[1]  # built once per forward, shared
    if name == "llama" and side == "none":
        assert seen[0] is None  # plain causal: the kernels' causal fast path
        return
    assert isinstance(seen[0], masks.Mask)
    if implementation == "multihead-tiled":
        assert 0 < sum(visited) < 2 * 12 * 12  # tiles were skipped


@pytest.mark.parametrize("name", sorted(SDPA_MODELS))
def test_cached_chunks_match_sdpa(transformers, name):
    """Prefill 7 left-padded tokens, then a chunk of 3 and single tokens on the cache (the
    window of 4 is then full): every step's logits equal sdpa's (bottom-right alignment)."""
    config = SDPA_MODELS[name](transformers)
    sdpa, ours = twin_models(transformers.AutoModelForCausalLM, config, theirs="sdpa")
    ids, keep = padded_batch("left", (13, 9), seq=13)
    caches = {}
    with torch.no_grad():
        for start, stop in ((0, 7), (7, 10), (10, 11), (11, 12), (12, 13)):
            logits = []
            for model in (sdpa, ours):
                out = model(
                    ids[:, start:stop],
                    attention_mask=keep[:, :stop],
                    cache=caches.get(id(model)),
                    use_cache=True,
                )
                caches[id(model)] = out.cache
                logits.append(out.logits)
            assert_close_where(logits[1], logits[0], keep[:, start:stop])


@pytest.mark.parametrize("name", sorted(SDPA_MODELS))
def test_generate_gives_sdpa_tokens_past_the_window(transformers, name):
    config = SDPA_MODELS[name](transformers)
    config.tie_word_embeddings = False
    sdpa, ours = twin_models(transformers.AutoModelForCausalLM, config, theirs="sdpa")
    ids, keep = padded_batch("left", lengths=(6, 3), seq=6)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    expected = sdpa.generate(ids, attention_mask=keep, **settings)
    actual = ours.generate(ids, attention_mask=keep, **settings)
    assert expected.shape == (2, 6 + 8)
    assert all(len(set(row)) > 1 for row in expected[:, 6:].tolist())  # no token echoed
    assert torch.equal(actual, expected)


def test_benchmark_quick_runs_and_agrees(tmp_path):
    pytest.importorskip("transformers", reason=REASON)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_huggingface.py"
    out = tmp_path / "huggingface.json"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1", "--out", str(out)],
        check=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    for field in ("config", "machine", "rounds", "times", "paired_ratio", "max_abs_diff"):
        assert field in result, field
    assert set(result["times"]) == {"sdpa", "multihead"}
    assert result["paired_ratio"] > 0
    assert result["max_abs_diff"] < 1e-4  # same weights, same outputs
    assert result["kernel"].startswith("tiled")  # the block-skipping path was compared
    assert out.with_suffix(".png").stat().st_size > 0


# -- the attention function alone ----------------------------------------------------------


class _Layer(torch.nn.Module):
    """What attention_forward reads from the calling layer."""

    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.is_causal = is_causal


def _qkv(q_len: int = 5, k_len: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(2, 4, q_len, 8, generator=generator)
    key = torch.randn(2, 2, k_len, 8, generator=generator)
    value = torch.randn(2, 2, k_len, 8, generator=generator)
    return query, key, value


def _eager(query, key, value, bias=None, causal=False):
    """softmax(QKᵀ/√d + bias) V with the key/value heads repeated, in (batch, seq, heads, d)."""
    key, value = (t.repeat_interleave(2, dim=1) for t in (key, value))
    scores = query @ key.transpose(-1, -2) / 8**0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), -1e30)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ value).transpose(1, 2)


def test_float_mask_and_position_bias_are_additive():
    query, key, value = _qkv()
    bias = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    hidden = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(4)) < 0.3
    float_mask = torch.zeros(2, 1, 5, 5).masked_fill(hidden, -1e9)
    float_mask[..., 0] = 0.0  # every query keeps a key
    layer = _Layer(is_causal=False).eval()
    out, weights = attention_forward(layer, query, key, value, float_mask)
    assert weights is None
    torch.testing.assert_close(out, _eager(query, key, value, float_mask), **FP32)
    out, _ = attention_forward(layer, query, key, value, float_mask, position_bias=bias)
    torch.testing.assert_close(out, _eager(query, key, value, float_mask + bias), **FP32)
    bool_mask = float_mask == 0
    out, _ = attention_forward(layer, query, key, value, bool_mask, position_bias=bias)
    torch.testing.assert_close(out, _eager(query, key, value, float_mask + bias), **FP32)


def test_causal_only_without_a_mask_and_for_more_than_one_query():
    query, key, value = _qkv()
    causal_layer = _Layer(is_causal=True).eval()
    out, _ = attention_forward(causal_layer, query, key, value, None)
    torch.testing.assert_close(out, _eager(query, key, value, causal=True), **FP32)
    # is_causal passed by the caller wins over the layer's attribute.
    out, _ = attention_forward(causal_layer, query, key, value, None, is_causal=False)
    torch.testing.assert_close(out, _eager(query, key, value), **FP32)
    # One query after a cache sees every key.
    out, _ = attention_forward(causal_layer, query[:, :, -1:], key, value, None)
    torch.testing.assert_close(out, _eager(query[:, :, -1:], key, value), **FP32)


def test_dropout_only_while_training():
    query, key, value = _qkv()
    layer = _Layer(is_causal=False).eval()
    out, _ = attention_forward(layer, query, key, value, None, dropout=0.5)
    torch.testing.assert_close(out, _eager(query, key, value), **FP32)
    layer.train()
    out, _ = attention_forward(layer, query, key, value, None, dropout=0.5)
    assert not torch.allclose(out, _eager(query, key, value))


def test_attention_sinks_are_refused():
    query, key, value = _qkv()
    with pytest.raises(ValueError, match="s_aux"):
        attention_forward(_Layer(True), query, key, value, None, s_aux=torch.zeros(4))


# -- registering ---------------------------------------------------------------------------


def test_register_is_idempotent_and_checks_its_arguments(transformers):
    assert register() == "multihead"
    first = transformers.AttentionInterface._global_mapping["multihead"]
    assert register() == "multihead"
    assert transformers.AttentionInterface._global_mapping["multihead"] is first
    assert "multihead" in transformers.AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="kernel"):
        register("multihead-x", kernel="flash")
    for taken in ("eager", "org/repo", "paged|multihead"):
        with pytest.raises(ValueError, match="taken by transformers"):
            register(taken)


def test_missing_transformers_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install multihead\[hf\]"):
        register()


def test_import_multihead_does_not_import_transformers():
    code = (
        "import sys, multihead, multihead.integrations.huggingface; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
