"""The applications' contenders (benchmarks/contenders.py, benchmarks/torch_twins.py).

The twins must be our models with only the attention stack swapped for torch.nn's: with the
same weights they give our outputs (so a difference in training comes from the library), they
start from the weights our recipe's model starts from, and the contender script runs the
recipe and leaves its evidence where the README reads it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multihead.attention_config import AttentionConfig
from multihead.masks import padding
from multihead.models import Seq2SeqConfig, Seq2SeqTransformer
from multihead.models.speech import SpeechEncoder, SpeechEncoderConfig
from multihead.models.vit import ViT, ViTConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
torch_twins = pytest.importorskip("torch_twins")


def test_vit_twin_starts_from_our_weights_and_gives_our_logits() -> None:
    config = ViTConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64)
    torch.manual_seed(3)
    ours = ViT(config).eval()
    torch.manual_seed(3)
    twin = torch_twins.torch_vit(config).eval()
    assert isinstance(twin.encoder, torch_twins.TorchEncoder)
    assert isinstance(twin.encoder.stack, torch.nn.TransformerEncoder)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(twin(images), ours(images), rtol=1e-5, atol=1e-5)


def test_speech_twin_masks_padding_as_ours_does() -> None:
    config = SpeechEncoderConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64)
    torch.manual_seed(4)
    ours = SpeechEncoder(config).eval()
    torch.manual_seed(4)
    twin = torch_twins.torch_speech_encoder(config).eval()
    feats = torch.randn(3, 64, config.n_mels, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([64, 41, 23])
    (ours_out, ours_len), (twin_out, twin_len) = ours(feats, lengths), twin(feats, lengths)
    assert torch.equal(ours_len, twin_len)
    for row, length in enumerate(ours_len.tolist()):  # past the length: padding, not compared
        torch.testing.assert_close(twin_out[row, :length], ours_out[row, :length])
    # The mask matters: without it the shorter rows' real frames would see the padding.
    frames = int(ours_len.max())
    hidden = torch.randn(3, frames, 32, generator=torch.Generator().manual_seed(2))
    masked = twin.encoder(hidden, mask=padding(ours_len, frames))
    unmasked = twin.encoder(hidden)
    short = ours_len[-1]
    assert not torch.allclose(masked[-1, :short], unmasked[-1, :short], atol=1e-3)
    torch.testing.assert_close(masked[0], unmasked[0])  # the full-length row sees no padding


@pytest.mark.parametrize(
    "options",
    [{"attention": AttentionConfig(positions="rope"), "absolute_positions": False},
     {"conv_kernel": 5}],
)  # fmt: skip
def test_speech_twin_refuses_what_torch_lacks(options: dict[str, object]) -> None:
    config = SpeechEncoderConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64,
                                 **options)  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(ValueError, match="--positions sinusoidal"):
        torch_twins.torch_speech_encoder(config)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_seq2seq_twin_decodes_as_ours(beam_size: int) -> None:
    config = Seq2SeqConfig(
        vocab_size=40, d_model=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
        dim_feedforward=32, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(5)
    ours = Seq2SeqTransformer(config)
    torch.manual_seed(5)
    twin = torch_twins.torch_seq2seq(config)  # our recipe's initial weights: same seed
    g = torch.Generator().manual_seed(2)
    src = torch.randint(3, 40, (4, 7), generator=g)
    tgt = torch.randint(3, 40, (4, 6), generator=g)
    ours.eval(), twin.eval()
    torch.testing.assert_close(twin(src, tgt), ours(src, tgt), rtol=1e-5, atol=1e-5)
    mine = ours.generate(src, beam_size=beam_size, max_new_tokens=9, return_scores=True)
    theirs = twin.generate(src, beam_size=beam_size, max_new_tokens=9, return_scores=True)
    assert theirs[0] == mine[0]
    torch.testing.assert_close(torch.tensor(theirs[1]), torch.tensor(mine[1]))


def test_contender_script_runs_the_image_recipe(tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    argv = [
        sys.executable, str(BENCHMARKS / "contenders.py"), "image", "--runs", str(tmp_path),
        "--out", str(out), "--steps", "30", "--minutes", "5", "--eval-every", "15",
        "--d-model", "16", "--heads", "2", "--layers", "1", "--ff", "32", "--no-progress",
    ]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 30
    assert 0.0 <= results["vit_test_accuracy"] <= 1.0
    assert results["args"]["run_dir"] == str(tmp_path / "contender-image")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [15, 30]
