"""`multihead` as a Hugging Face attention implementation, checked against transformers' eager.

Tiny models are built from configs in code with random weights (nothing is downloaded); the
"multihead" model loads the eager model's state_dict, so any difference is the attention.
Outputs are compared at the positions the padding mask keeps: a padded query with no visible
key gets 0 here but a uniform average in eager, and no kept position ever sees it.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import Tensor

import multihead.integrations.huggingface as hf_attention
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


CAUSAL_LMS = {"llama": llama_config, "gpt2": gpt2_config, "gemma2": gemma2_config}


def twin_models(auto_class, config, implementation: str = "multihead", seed: int = 0):
    """(eager model, same weights with ``implementation``), in eval mode.

    Each gets its own copy of the config: from_config writes the implementation into the
    config it is given, so a shared one would switch the eager model too.
    """
    torch.manual_seed(seed)
    eager = auto_class.from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = auto_class.from_config(copy.deepcopy(config), attn_implementation=implementation)
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == implementation
    assert eager.config._attn_implementation == "eager"
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
    # The padding mask arrives as a bool (True = may attend) tensor, causal part included.
    assert all(mask.dtype == torch.bool and mask.shape == (3, 1, 9, 9) for *_, mask in seen)


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
