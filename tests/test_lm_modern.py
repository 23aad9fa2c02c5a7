"""TransformerLM's modern recipe, packed training and sampling, against independent oracles:
a Llama forward written out here in float64, each document run alone, and distributions
whose top-k / top-p sets are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multihead import decoding, masks
from multihead.attention_config import AttentionConfig
from multihead.models import LMConfig, TransformerLM
from multihead.models.lm import document_positions
from multihead.transformer import DecoderOnly

VOCAB = 37


def modern(**overrides: object) -> TransformerLM:
    sizes = {"d_model": 32, "num_heads": 4, "num_layers": 2, "dim_feedforward": 48}
    model = TransformerLM(LMConfig.modern(VOCAB, **{**sizes, **overrides}))
    with torch.no_grad():  # sharper than the init: attention and tokens then vary
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.3 if p.ndim == 2 else 0.1)
    return model.eval()


# -- the recipe against a forward written out ----------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """(batch, seq, heads, dim): feature i pairs with i + dim/2, angle = position·θ^(−2i/dim)."""
    seq, dim = x.shape[1], x.shape[-1]
    freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq  # (seq, dim/2)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def llama_logits(model: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    """Llama's forward (and Mistral's with a window) from the weights, in float64."""
    c = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    heads, kv, dim = c.num_heads, c.num_kv_heads or c.num_heads, c.d_model // c.num_heads
    seq = ids.shape[1]
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    visible = (j <= i) & (j > i - (c.window or seq))
    x = w["embedding.weight"][ids]
    for n in range(c.num_layers):
        p = f"blocks.layers.{n}."
        h = rms_norm(x, w[p + "norm1.weight"], c.norm_eps)
        q, k, v = (h @ w[p + "self_attn.in_proj.weight"].T).split(
            [heads * dim, kv * dim, kv * dim], -1
        )
        q = rope(q.unflatten(-1, (heads, dim)), c.rope_base)
        k = rope(k.unflatten(-1, (kv, dim)), c.rope_base).repeat_interleave(heads // kv, 2)
        v = v.unflatten(-1, (kv, dim)).repeat_interleave(heads // kv, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
        weights = scores.masked_fill(~visible, -math.inf).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)
        x = x + out @ w[p + "self_attn.out_proj.weight"].T
        h = rms_norm(x, w[p + "norm2.weight"], c.norm_eps)
        gate, up = (h @ w[p + "feed_forward.linear1.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ w[p + "feed_forward.linear2.weight"].T
    x = rms_norm(x, w["blocks.norm.weight"], c.norm_eps)
    head = w["embedding.weight"] if c.tie_embeddings else w["head.weight"]
    return x @ head.T


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_kv_heads": 2, "window": 4, "rope_base": 300.0}, {"tie_embeddings": True}],
    ids=["llama", "gqa-window-theta", "tied"],
)
def test_modern_recipe_equals_the_written_out_forward(overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = modern(**overrides).double()
    ids = torch.randint(0, VOCAB, (2, 11))
    torch.testing.assert_close(model(ids), llama_logits(model, ids), atol=1e-9, rtol=1e-9)
    assert (model.head is None) == model.config.tie_embeddings
    assert all(p is None for n, p in model.named_parameters() if n.endswith("bias"))


def test_window_and_theta_change_the_logits() -> None:
    """So the equality above checks them: a model without them gives other logits."""
    torch.manual_seed(1)
    model = modern(window=3, rope_base=50.0).double()
    ids = torch.randint(0, VOCAB, (1, 9))
    for change in ({"window": None}, {"rope_base": 10000.0}):
        other = TransformerLM(LMConfig(**{**model.config.__dict__, **change})).double().eval()
        other.load_state_dict(model.state_dict())
        assert not torch.allclose(other(ids), model(ids), atol=1e-3)


def test_modern_model_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(2)
    model = modern(num_kv_heads=2, window=5)
    ids = torch.randint(0, VOCAB, (2, 7))
    model.save_pretrained(tmp_path)
    loaded = TransformerLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(ids), model(ids))


# -- packed training -----------------------------------------------------------------------


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")


@pytest.mark.parametrize("positions", ["rope", "learned", "sinusoidal", "alibi"])
def test_packed_documents_train_as_if_alone(positions: str) -> None:
    torch.manual_seed(3)
    model = modern(positions=positions, max_len=16).double()
    first, second = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 7))
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    losses = token_losses(model(packed, doc_ids=doc_ids), packed)
    inside = torch.ones(11, dtype=torch.bool)
    inside[4] = False  # the last token of the first document does not predict the second's
    alone = torch.cat([token_losses(model(first), first), token_losses(model(second), second)])
    torch.testing.assert_close(losses[inside], alone, atol=1e-10, rtol=1e-10)

    grads = torch.autograd.grad(losses[inside].sum(), list(model.parameters()), allow_unused=True)
    alone_total = (
        token_losses(model(first), first).sum() + token_losses(model(second), second).sum()
    )
    expected = torch.autograd.grad(alone_total, list(model.parameters()), allow_unused=True)
    for got, want in zip(grads, expected, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    # Without the documents the second one sees the first: another loss.
    assert not torch.allclose(token_losses(model(packed), packed)[inside], alone, atol=1e-4)


def test_a_documents_mask_packs_as_doc_ids_do_for_relative_positions() -> None:
    torch.manual_seed(4)
    model = modern(num_kv_heads=2, window=4).double()
    ids = torch.randint(0, VOCAB, (2, 10))
    doc_ids = torch.tensor([[0] * 6 + [1] * 4, [0] * 2 + [1] * 5 + [2] * 3])
    by_ids = model(ids, doc_ids=doc_ids)
    by_mask = model(ids, mask=masks.documents(doc_ids) & masks.causal(10))
    torch.testing.assert_close(by_mask, by_ids, atol=1e-10, rtol=1e-10)
    # Row 1's last document, alone, under the window.
    torch.testing.assert_close(by_ids[1:, 7:], model(ids[1:, 7:]), atol=1e-10, rtol=1e-10)


def test_document_positions_restart_at_each_document() -> None:
    doc_ids = torch.tensor([[4, 4, 4, 7, 7, 1], [0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(document_positions(doc_ids), expected)


def test_packed_input_errors_name_the_argument() -> None:
    model = modern()
    ids = torch.randint(0, VOCAB, (2, 6))
    docs = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"doc_ids must be \(batch, seq\) = \(2, 6\)"):
        model(ids, doc_ids=docs[:, :5])
    with pytest.raises(TypeError, match="doc_ids must be an integer tensor"):
        model(ids, doc_ids=docs.float())
    with pytest.raises(ValueError, match="pass mask or caches without it"):
        model(ids, doc_ids=docs, mask=masks.causal(6))
    with pytest.raises(ValueError, match="mask is 5x5"):
        model(ids, mask=masks.causal(5))


# -- sampling ------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_generator() -> None:
    torch.manual_seed(5)
    model = modern()
    prompt = torch.randint(0, VOCAB, (3, 4))

    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, max_new_tokens=12, temperature=1.5, generator=generator)

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert not torch.equal(draw(0), model.generate(prompt, max_new_tokens=12))


def test_top_k_of_one_is_greedy() -> None:
    torch.manual_seed(6)
    model = modern(num_kv_heads=2)
    prompt = torch.randint(0, VOCAB, (2, 3))
    greedy = model.generate(prompt, max_new_tokens=10)
    generator = torch.Generator().manual_seed(0)
    sampled = model.generate(
        prompt, max_new_tokens=10, temperature=2.0, top_k=1, generator=generator
    )
    assert torch.equal(sampled, greedy)
    assert torch.equal(model(greedy)[:, 2:-1].argmax(-1), greedy[:, 3:])


def nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of likeliest tokens whose probability reaches top_p, by a loop."""
    probs = logits.double().softmax(-1).tolist()
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return kept


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    for kwargs, support in (
        ({"top_p": 0.7}, {0, 1}),
        ({"top_p": 0.5}, {0}),
        ({"top_p": 0.81}, {0, 1, 2}),
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 3, "top_p": 0.7}, {0, 1}),
        ({}, {0, 1, 2, 3}),
    ):
        generator = torch.Generator().manual_seed(0)
        drawn = decoding.sample(logits, temperature=1.0, generator=generator, **kwargs)
        assert set(drawn.tolist()) == support, kwargs
    frequency = (drawn == 0).double().mean().item()  # the last: the plain distribution
    assert abs(frequency - 0.5) < 0.03


def test_generated_tokens_stay_in_the_nucleus() -> None:
    torch.manual_seed(7)
    model = modern().double()
    prompt = torch.randint(0, VOCAB, (4, 3))
    generator = torch.Generator().manual_seed(3)
    out = model.generate(prompt, max_new_tokens=15, temperature=1.0, top_p=0.6, generator=generator)
    logits = model(out)
    for row in range(out.shape[0]):
        for t in range(3, out.shape[1]):
            assert out[row, t].item() in nucleus(logits[row, t - 1], 0.6)


@pytest.mark.parametrize("positions", ["rope", "alibi", "learned"])
def test_cached_and_recomputed_generation_agree_past_the_window(positions: str) -> None:
    torch.manual_seed(8)
    model = modern(window=4, num_kv_heads=2, max_len=32, positions=positions).double()
    prompt = torch.randint(0, VOCAB, (2, 6))
    cached = model.generate(prompt, max_new_tokens=20)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=20, use_cache=False))
    assert torch.equal(model(cached)[:, 5:-1].argmax(-1), cached[:, 6:])
    g1, g2 = (torch.Generator().manual_seed(9) for _ in range(2))
    sampled = model.generate(prompt, max_new_tokens=20, temperature=0.8, top_k=5, generator=g1)
    recomputed = model.generate(
        prompt, max_new_tokens=20, temperature=0.8, top_k=5, generator=g2, use_cache=False
    )
    assert torch.equal(sampled, recomputed)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number"),
        ({"temperature": 1.0, "top_k": 0}, ValueError, "top_k must be None or an int >= 1"),
        ({"temperature": 1.0, "top_p": 0.0}, ValueError, r"top_p must be None or a number in"),
        ({"temperature": 1.0, "top_p": 1.5}, ValueError, r"top_p must be None or a number in"),
        ({"top_k": 3}, ValueError, "give a temperature > 0"),
        ({"temperature": 1.0, "generator": 3}, TypeError, "generator must be a torch.Generator"),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 0"),
    ],
)
def test_bad_sampling_arguments_are_named(kwargs, error, words) -> None:
    model = modern(num_layers=1)
    with pytest.raises(error, match=words):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"positions": "relative"}, "positions must be one of"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"window": 0}, "window must be None or a positive int"),
        ({"norm_eps": 0.0}, "norm_eps must be a positive number"),
        ({"rope_base": -2.0}, "rope_base must be a positive number"),
        ({"d_model": 12, "num_heads": 4}, "even head size"),
    ],
)
def test_bad_configs_are_named(overrides, words) -> None:
    with pytest.raises(ValueError, match=words):
        LMConfig.modern(VOCAB, **overrides)


# -- one decoding helper for any stack -----------------------------------------------------


class TinyLM(nn.Module):
    """A model a user might build: embedding, a DecoderOnly stack with RoPE, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        config = AttentionConfig(positions="rope", num_kv_heads=1, window=3)
        self.stack = DecoderOnly(2, 16, 2, 32, 0.0, activation="swiglu", attention=config)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor, offset: int = 0, caches=None) -> torch.Tensor:
        return self.head(self.stack(self.embedding(ids), caches=caches))


def test_the_decoding_helper_runs_any_stack() -> None:
    torch.manual_seed(10)
    model = TinyLM().eval()
    with torch.no_grad():
        model.embedding.weight.mul_(3)
    prompt = torch.randint(0, VOCAB, (2, 4))
    cached = decoding.generate(model, prompt, max_new_tokens=9, stack=model.stack)
    recomputed = decoding.generate(model, prompt, max_new_tokens=9)
    assert torch.equal(cached, recomputed)
    assert torch.equal(model(cached)[:, 3:-1].argmax(-1), cached[:, 4:])
    assert len(set(cached[:, 4:].flatten().tolist())) > 2
    with pytest.raises(ValueError, match="non-empty"):
        decoding.generate(model, prompt[:, :0], max_new_tokens=2)
