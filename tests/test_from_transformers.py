"""`from_transformers` against transformers' own Llama and Mistral: tiny models built from
their configs (random weights, nothing downloaded), the same logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from multihead.integrations.convert import from_transformers  # noqa: E402

SIZES = {
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


def build(kind: str, **overrides: object) -> torch.nn.Module:
    """A tiny transformers model with weights larger than its init, so attention is peaked
    and a wrong position, window or weight shows in the logits."""
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    config = config_class(**{**SIZES, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.15 if p.ndim == 2 else 0.05)
    return model.eval()


CASES = {
    "llama": ("llama", {}),
    "llama-bias-theta-tied": (
        "llama",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 300.0},
        },
    ),
    "mistral-window-8": ("mistral", {"sliding_window": 8}),
    "mistral-no-window": ("mistral", {"sliding_window": None}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case: str) -> None:
    kind, overrides = CASES[case]
    theirs = build(kind, **overrides)
    ours = from_transformers(theirs)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
    torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)
    c = ours.config
    assert (c.window, c.tie_embeddings) == (
        overrides.get("sliding_window"),
        theirs.config.tie_word_embeddings,
    )
    assert (ours.head is None) == c.tie_embeddings


@pytest.mark.parametrize("case", ["llama", "llama-bias-theta-tied", "mistral-window-8"])
def test_cached_greedy_generation_gives_their_tokens(case: str) -> None:
    kind, overrides = CASES[case]
    theirs = build(kind, **overrides)
    ours = from_transformers(theirs)
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    expected = theirs.generate(prompt, max_new_tokens=20, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=20)  # 25 tokens: past the window of 8
    assert torch.equal(got, expected)
    assert len(set(got[:, 5:].flatten().tolist())) > 3


def test_the_settings_that_are_converted_change_their_logits() -> None:
    """So the equality above checks them: the window, θ and the biases each matter."""
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        window = build("mistral", sliding_window=8)(ids).logits
        no_window = build("mistral", sliding_window=None)(ids).logits
        theta = build("llama", rope_parameters={"rope_type": "default", "rope_theta": 300.0})
        plain = build("llama")(ids).logits
    assert torch.allclose(window[:, :8], no_window[:, :8], atol=1e-5)
    assert not torch.allclose(window[:, 8:], no_window[:, 8:], atol=1e-2)
    with torch.no_grad():
        assert not torch.allclose(theta(ids).logits, plain, atol=1e-2)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
            r"rope_parameters.*'linear'",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                }
            },
            "partial_rotary_factor",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 8}, "head_dim=8"),
    ],
)
def test_what_cannot_be_converted_is_refused_by_name(overrides, words) -> None:
    with pytest.raises(ValueError, match=words):
        from_transformers(build("llama", **overrides))


def test_other_models_are_refused() -> None:
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        from_transformers(torch.nn.Linear(2, 2))


def test_eos_token_id_becomes_eos_id() -> None:
    assert from_transformers(build("llama", eos_token_id=7)).config.eos_id == 7
    assert from_transformers(build("llama", eos_token_id=[7, 8])).config.eos_id is None
