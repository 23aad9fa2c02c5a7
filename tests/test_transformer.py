"""Transformer layers against torch's, with the same weights; positional encodings."""

import math

import pytest
import torch
from torch import nn

from multihead.positional import LearnedPositions, SinusoidalPositions
from multihead.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer

D, H, FF, B, S, T = 16, 4, 32, 2, 5, 4


def padding(lengths: list[int], max_len: int) -> torch.Tensor:
    """torch's key_padding_mask: True = padding (ignored)."""
    return torch.arange(max_len) >= torch.tensor(lengths).unsqueeze(1)


def ours_from_torch_padding(pad: torch.Tensor, q_len: int) -> torch.Tensor:
    """Our polarity: (batch, 1, q_len, k_len), True = may attend."""
    return (~pad)[:, None, None, :].expand(-1, 1, q_len, -1)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(
        D, H, FF, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    ours = EncoderLayer.from_torch(theirs).eval()
    assert ours.norm_first == norm_first and ours.feed_forward.activation == activation
    x = torch.randn(B, S, D)
    pad = padding([S, 3], S)
    expected = theirs(x, src_key_padding_mask=pad)
    got = ours(x, mask=ours_from_torch_padding(pad, S))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_matches_torch(norm_first: bool, activation: str) -> None:
    torch.manual_seed(1)
    theirs = nn.TransformerDecoderLayer(
        D, H, FF, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    ours = DecoderLayer.from_torch(theirs).eval()
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    memory_pad = padding([S, 2], S)
    expected = theirs(
        x,
        memory,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
        tgt_is_causal=True,
        memory_key_padding_mask=memory_pad,
    )
    got = ours(x, memory, causal=True, memory_mask=ours_from_torch_padding(memory_pad, T))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_stacks_match_torch_stacks() -> None:
    torch.manual_seed(2)
    ours_enc = Encoder(2, D, H, FF, norm_first=True).eval()
    theirs_enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, H, FF, batch_first=True, norm_first=True),
        2,
        norm=nn.LayerNorm(D),
        enable_nested_tensor=False,
    ).eval()
    for i, layer in enumerate(theirs_enc.layers):
        ours_enc.layers[i].load_state_dict(EncoderLayer.from_torch(layer).state_dict())
    ours_enc.norm.load_state_dict(theirs_enc.norm.state_dict())
    x = torch.randn(B, S, D)
    torch.testing.assert_close(ours_enc(x), theirs_enc(x), atol=1e-5, rtol=1e-5)

    ours_dec = Decoder(2, D, H, FF, norm_first=False).eval()
    assert ours_dec.norm is None  # post-norm: the last layer already ends with a norm
    theirs_dec = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(D, H, FF, batch_first=True, norm_first=False), 2
    ).eval()
    for i, layer in enumerate(theirs_dec.layers):
        ours_dec.layers[i].load_state_dict(DecoderLayer.from_torch(layer).state_dict())
    y, memory_pad = torch.randn(B, T, D), padding([S, 2], S)
    expected = theirs_dec(
        y,
        x,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
        tgt_is_causal=True,
        memory_key_padding_mask=memory_pad,
    )
    got = ours_dec(y, x, memory_mask=ours_from_torch_padding(memory_pad, T))  # causal by default
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_from_torch_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="layer must be"):
        EncoderLayer.from_torch(nn.Linear(2, 2))  # type: ignore[arg-type]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dimension (Zhang & Sennrich, 2019);
    eps None is torch's default, the float32 machine epsilon (the layer runs in float32)."""
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def rmsnorm_gqa_qknorm_layer(layer: EncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """The pre-norm causal block written out in plain torch ops, in float64: RMSNorm, the
    projections without bias, RMSNorm on each head's queries and keys, each key/value head
    shared by a group of query heads, causal softmax(q·k/√d)·v, W_o, ReLU feed-forward."""
    attn, w = layer.self_attn, {k: v.double() for k, v in layer.state_dict().items()}
    heads, kv_heads, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    h = rms_norm(x, w["norm1.weight"], layer.norm1.eps)
    q, k, v = (h @ w["self_attn.in_proj.weight"].T).split([D, kv_heads * d, kv_heads * d], -1)
    q = rms_norm(q.unflatten(-1, (heads, d)), w["self_attn.q_norm.weight"], attn.q_norm.eps)
    k = rms_norm(k.unflatten(-1, (kv_heads, d)), w["self_attn.k_norm.weight"], attn.k_norm.eps)
    v = v.unflatten(-1, (kv_heads, d))
    group = heads // kv_heads  # query head i reads key/value head i // group
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, -math.inf).softmax(-1)
    heads_out = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)
    x = x + heads_out @ w["self_attn.out_proj.weight"].T
    h = rms_norm(x, w["norm2.weight"], layer.norm2.eps)
    hidden = torch.relu(h @ w["feed_forward.linear1.weight"].T)
    return x + hidden @ w["feed_forward.linear2.weight"].T


def test_rmsnorm_gqa_qknorm_layer_matches_a_hand_computation() -> None:
    torch.manual_seed(3)
    layer = EncoderLayer(D, H, FF, norm="rmsnorm", num_kv_heads=2, qk_norm=True, bias=False)
    layer.eval()
    with torch.no_grad():  # norms away from their all-ones start, so their weights count
        for norm in (layer.norm1, layer.norm2, layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(B, S, D)
    expected = rmsnorm_gqa_qknorm_layer(layer, x.double())
    torch.testing.assert_close(layer(x, causal=True).double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="norm must be"):
        EncoderLayer(D, H, FF, norm="batchnorm")  # type: ignore[arg-type]


def test_sinusoidal_positions_follow_the_paper() -> None:
    d_model, max_len = 6, 7
    pe = SinusoidalPositions(d_model, max_len).pe
    for pos in range(max_len):
        for i in range(d_model):
            angle = pos / 10000 ** ((i - i % 2) / d_model)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert abs(pe[pos, i].item() - expected) < 1e-6


def test_positions_offset_and_max_len() -> None:
    sinusoidal = SinusoidalPositions(4, 10)
    x = torch.zeros(1, 3, 4)
    torch.testing.assert_close(sinusoidal(x, offset=2), sinusoidal.pe[2:5].unsqueeze(0))
    assert "pe" not in sinusoidal.state_dict()  # rebuilt, never saved
    learned = LearnedPositions(4, 5)
    torch.testing.assert_close(learned(x, offset=1)[0], learned.embedding.weight[1:4])
    with pytest.raises(ValueError, match="max_len is 5"):
        learned(x, offset=3)
    with pytest.raises(ValueError, match="max_len is 10"):
        sinusoidal(torch.zeros(1, 11, 4))
