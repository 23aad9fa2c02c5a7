"""The Conformer convolution module against a float64 loop, and in the speech encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multihead.models import ConvolutionModule, SpeechEncoder, SpeechEncoderConfig


def _reference(module: ConvolutionModule, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The block written out frame by frame in float64: each output frame sums its
    neighbours' gated features, weighted per channel, with zeros past the real frames."""
    x = x.double()
    p = {k: v.double() for k, v in module.state_dict().items()}
    h = F.layer_norm(x, x.shape[-1:], p["norm.weight"], p["norm.bias"])
    h = h @ p["pointwise_in.weight"].T + p["pointwise_in.bias"]
    d = x.shape[-1]
    h = h[..., :d] * torch.sigmoid(h[..., d:])
    h = h * real[..., None]
    weight = p["depthwise.weight"][:, 0]  # (d_model, kernel)
    kernel = weight.shape[1]
    out = torch.zeros_like(h)
    for t in range(x.shape[1]):
        for k in range(kernel):
            source = t + k - kernel // 2
            if 0 <= source < x.shape[1]:
                out[:, t] += h[:, source] * weight[:, k]
    out = out + p["depthwise.bias"]
    out = F.layer_norm(out, (d,), p["depthwise_norm.weight"], p["depthwise_norm.bias"])
    out = F.silu(out) @ p["pointwise_out.weight"].T + p["pointwise_out.bias"]
    return x + out


def test_matches_the_frame_by_frame_reference() -> None:
    torch.manual_seed(0)
    module = ConvolutionModule(8, kernel_size=5).eval()
    x = torch.randn(3, 11, 8)
    real = torch.arange(11) < torch.tensor([11, 7, 2])[:, None]
    want = _reference(module, x, real)
    torch.testing.assert_close(module(x, real).double(), want, atol=1e-5, rtol=1e-5)


def test_real_frames_do_not_depend_on_the_padding() -> None:
    torch.manual_seed(0)
    module = ConvolutionModule(8, kernel_size=7).eval()
    alone = torch.randn(1, 6, 8)
    padded = torch.cat([alone, 100 * torch.randn(1, 5, 8)], dim=1)
    real = torch.arange(11) < 6
    torch.testing.assert_close(module(padded, real[None])[:, :6], module(alone, real[None, :6]))


@pytest.mark.parametrize("kernel", [0, 4, -3])
def test_kernel_must_be_positive_and_odd(kernel: int) -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        ConvolutionModule(8, kernel)


def test_speech_encoder_with_convolutions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = SpeechEncoderConfig(n_mels=16, d_model=16, num_heads=2, num_layers=2,
                                 dim_feedforward=32, conv_channels=4, dropout=0.0,
                                 conv_kernel=5)  # fmt: skip
    model = SpeechEncoder(config).eval()
    assert len(model.convolutions) == 2
    feats = torch.randn(2, 60, 16)
    lengths = torch.tensor([60, 30])
    # The short utterance gives the same output padded in a batch as alone.
    batched = model(feats, lengths)[0][1, :6]
    alone = model(feats[1:, :30], lengths[1:])[0][0]
    torch.testing.assert_close(batched, alone)
    # With every convolution's output projection zeroed the blocks are identities: the
    # model is the plain encoder with the same weights.
    plain = SpeechEncoder(SpeechEncoderConfig(**{**vars(config), "conv_kernel": 0})).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for convolution in model.convolutions:
            convolution.pointwise_out.weight.zero_()
            convolution.pointwise_out.bias.zero_()
    torch.testing.assert_close(model(feats, lengths)[0], plain(feats, lengths)[0])
    model.save_pretrained(tmp_path)
    assert SpeechEncoder.from_pretrained(tmp_path).config == config
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["conv_kernel"]  # configs saved before the field existed had no convolutions
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="unexpected .*convolutions"):  # weights left over
        SpeechEncoder.from_pretrained(tmp_path)
    for bad in (2, -1, True):
        with pytest.raises(ValueError, match="conv_kernel"):
            SpeechEncoderConfig(conv_kernel=bad)
