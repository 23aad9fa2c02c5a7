"""The models (Seq2Seq, ViT, speech encoder) take ``attention=AttentionConfig(...)`` and every
attention layer gets it; saved configs without the field load as before; token-id checks
cost no host sync while compiling."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from multihead.attention_config import AttentionConfig
from multihead.models.base import check_token_ids, validate_token_ids
from multihead.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from multihead.models.speech import SpeechEncoder, SpeechEncoderConfig
from multihead.models.vit import ViT, ViTConfig
from multihead.multi_head_attention import MultiHeadAttention

MODELS = Path(__file__).resolve().parent.parent / "models"
OPTIONS = AttentionConfig(num_kv_heads=2, qk_norm=True, softcap=30.0, positions="rope")


def _seq2seq(attention=None, **overrides) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    sizes = {"d_model": 32, "num_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 2}
    sizes |= {"dim_feedforward": 64, "dropout": 0.0, "max_len": 32}
    config = Seq2SeqConfig(vocab_size=23, attention=attention, **sizes | overrides)
    return Seq2SeqTransformer(config).eval()


def _vit(attention=None) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(d_model=32, num_layers=2, attention=attention)).eval()


def _speech(attention=None) -> SpeechEncoder:
    torch.manual_seed(0)
    config = SpeechEncoderConfig(
        n_mels=16, d_model=32, num_layers=2, dim_feedforward=64, conv_channels=8, dropout=0.0
    )
    return SpeechEncoder(dataclasses.replace(config, attention=attention)).eval()


def _inputs(name: str):
    torch.manual_seed(1)
    if name == "seq2seq":
        src = torch.randint(3, 23, (2, 7))
        src[1, 5:] = 0
        return src, torch.randint(3, 23, (2, 6))
    if name == "vit":
        return (torch.randn(3, 1, 8, 8),)
    return torch.randn(2, 40, 16), torch.tensor([40, 25])


BUILD = {"seq2seq": _seq2seq, "vit": _vit, "speech": _speech}


def _output(name: str, model) -> torch.Tensor:
    out = model(*_inputs(name))
    return out[0] if name == "speech" else out


@pytest.mark.parametrize("name", list(BUILD))
def test_every_attention_layer_gets_the_options(name) -> None:
    model = BUILD[name](OPTIONS)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    assert len(layers) == (6 if name == "seq2seq" else 2)
    for where, attn in layers.items():
        cross = "cross_attn" in where
        assert attn.num_kv_heads == 2, where
        assert attn.q_norm is not None, where
        assert attn.softcap == 30.0, where
        assert attn.positions == (None if cross else "rope"), where
    # The options change what the model computes (same weights where both have them).
    plain = BUILD[name]()
    assert not torch.allclose(_output(name, model), _output(name, plain), atol=1e-3)


@pytest.mark.parametrize("name", list(BUILD))
def test_default_attention_is_todays_model(name) -> None:
    """None (a config saved before the field existed) and the empty AttentionConfig are the
    same model as before: same parameters, same outputs with the same weights."""
    before = BUILD[name]()
    explicit = BUILD[name](AttentionConfig())
    assert before.state_dict().keys() == explicit.state_dict().keys()
    explicit.load_state_dict(before.state_dict())
    torch.testing.assert_close(_output(name, explicit), _output(name, before), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(BUILD))
@pytest.mark.parametrize(
    "attention",
    [
        OPTIONS,
        AttentionConfig(positions="alibi", bias=False),
        AttentionConfig(positions="relative"),
    ],
    ids=["rope-gqa-qknorm-softcap", "alibi-nobias", "relative"],
)
def test_saved_attention_round_trips(tmp_path, name, attention) -> None:
    model = BUILD[name](attention)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attention"]["positions"] == attention.positions
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.attention == attention
    torch.testing.assert_close(_output(name, loaded), _output(name, model), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("directory", "cls"),
    [
        ("translate-en-fr", Seq2SeqTransformer),
        ("image-digits", ViT),
        ("speech-digits", SpeechEncoder),
    ],
)
def test_shipped_configs_without_the_field_load_as_plain_attention(
    directory, cls, tmp_path
) -> None:
    # A shipped config as saved before the field existed (newer saves write "attention": null).
    saved = json.loads((MODELS / directory / "config.json").read_text())
    saved.pop("attention", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = cls.load_config(tmp_path)
    assert config.attention is None
    skeleton = cls(config)
    for attn in skeleton.modules():
        if isinstance(attn, MultiHeadAttention):
            assert attn.positions is None and attn.softcap is None and attn.q_norm is None
            assert attn.num_kv_heads == attn.num_heads


POSITIONS_INSIDE = [
    AttentionConfig(num_kv_heads=2, positions="rope"),
    AttentionConfig(num_kv_heads=1, positions="alibi"),
    AttentionConfig(positions="relative", qk_norm=True),
]
POSITIONS_IDS = ["gqa-rope", "mqa-alibi", "relative-qknorm"]


@pytest.mark.parametrize("attention", POSITIONS_INSIDE, ids=POSITIONS_IDS)
def test_cached_decoding_equals_recompute_with_positions_inside(attention) -> None:
    """Token by token over the caches (positions from the cache's offset) gives the logits
    of the whole target at once, float64."""
    model = _seq2seq(attention, positions=None).double()
    assert model.positions is None
    src, tgt = _inputs("seq2seq")
    memory, src_mask = model.encode(src)
    full = model.decode(tgt, memory, src_mask)
    caches = model.new_caches(tgt.shape[0], tgt.shape[1], memory)
    steps = [
        model.decode(tgt[:, t : t + 1], memory, src_mask, offset=t, caches=caches)
        for t in range(tgt.shape[1])
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", POSITIONS_INSIDE, ids=POSITIONS_IDS)
@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_generation_equals_recompute_with_positions_inside(attention, beam_size) -> None:
    model = _seq2seq(attention, positions=None)
    src, _ = _inputs("seq2seq")
    kwargs = {"max_new_tokens": 8, "beam_size": beam_size, "return_scores": True}
    cached, cached_scores = model.generate(src, **kwargs)
    fresh, fresh_scores = model.generate(src, use_cache=False, **kwargs)
    assert cached == fresh
    assert cached_scores == pytest.approx(fresh_scores, abs=1e-4)


def test_rope_decoder_stays_causal() -> None:
    """RoPE inside attention and nothing added to the embeddings: a target prefix gives the
    first logits of the whole target (float64), and the positions matter (a shifted
    target changes them)."""
    model = _seq2seq(AttentionConfig(positions="rope"), positions=None).double()
    src, tgt = _inputs("seq2seq")
    full = model(src, tgt)
    torch.testing.assert_close(model(src, tgt[:, :3]), full[:, :3], rtol=1e-10, atol=1e-10)
    shifted = model(src, torch.cat([tgt[:, :1], tgt], dim=1))
    assert not torch.allclose(shifted[:, 1:4], full[:, :3], atol=1e-6)


def test_bad_attention_configs_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="encoder attends both ways"):
        _seq2seq(AttentionConfig(window=4))
    with pytest.raises(ValueError, match="encoder attends both ways"):
        ViTConfig(attention=AttentionConfig(window=4))
    with pytest.raises(ValueError, match=r"num_kv_heads must be None or a positive divisor.*\(4\)"):
        SpeechEncoderConfig(attention=AttentionConfig(num_kv_heads=3))
    with pytest.raises(ValueError, match="positions=None needs positions inside attention"):
        _seq2seq(positions=None)
    with pytest.raises(TypeError, match="attention must be an AttentionConfig, a dict"):
        ViTConfig(attention="rope")
    with pytest.raises(ValueError, match=r"attention has fields \['heads'\]"):
        ViTConfig(attention={"heads": 2})
    _vit(AttentionConfig(positions="rope")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention"]["positions"] = "spiral"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: positions must be None, 'rope'"):
        ViT.from_pretrained(tmp_path)


# -- token ids: checked in eager, no host sync while compiling ---------------------------------


def test_token_id_range_is_checked_in_eager() -> None:
    weight = torch.zeros(1)
    good = torch.tensor([[0, 9]])
    assert check_token_ids("ids", good, 10, weight) is good
    for bad, shown in (([[-1, 3]], r"\[-1, 3\]"), ([[2, 10]], r"\[2, 10\]")):
        with pytest.raises(ValueError, match=f"ids has ids in {shown} but vocab_size is 10"):
            check_token_ids("ids", torch.tensor(bad), 10, weight)
    model = _seq2seq()
    with pytest.raises(ValueError, match=r"src_ids has ids in \[3, 23\] but vocab_size is 23"):
        model(torch.tensor([[3, 23]]), torch.tensor([[1, 4]]))


def test_token_id_range_check_can_be_skipped() -> None:
    weight = torch.zeros(1)
    bad = torch.tensor([[2, 10]])
    assert check_token_ids("ids", bad, 10, weight, validate=False) is bad
    with validate_token_ids(False):
        assert check_token_ids("ids", bad, 10, weight) is bad
        with pytest.raises(ValueError, match="vocab_size is 10"):
            check_token_ids("ids", bad, 10, weight, validate=True)
    with pytest.raises(ValueError, match="vocab_size is 10"):  # restored after the block
        check_token_ids("ids", bad, 10, weight)
    # Type, shape and device are still checked when the range is not.
    with pytest.raises(TypeError, match="integer token ids"):
        check_token_ids("ids", bad.float(), 10, weight, validate=False)
    with pytest.raises(ValueError, match="2-D"):
        check_token_ids("ids", bad[0], 10, weight, validate=False)


def test_token_id_check_compiles_with_fullgraph() -> None:
    """Under torch.compile(fullgraph=True) the range check (a host sync, a graph break) is
    left out; forcing it in shows that it is what would break the graph."""
    torch._dynamo.reset()
    model = _seq2seq()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return model._embed(model._check_ids("src_ids", ids), "src")

    ids = torch.randint(3, 23, (2, 5))
    compiled = torch.compile(embed, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids), embed(ids))

    def forced(ids: torch.Tensor) -> torch.Tensor:
        return check_token_ids("ids", ids, 23, model.embedding.weight, validate=True) * 2

    with pytest.raises(Exception, match="(?i)graph break|unsupported|data-dependent"):
        torch.compile(forced, fullgraph=True, backend="eager")(ids)
    torch._dynamo.reset()
