"""The shipped English → French model and the translation pipeline on real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multihead.apps.translate import demo
from multihead.apps.translate.data import (
    PAD_ID,
    encode_pairs,
    load_splits,
    load_tokenizer,
    token_batches,
)
from multihead.apps.translate.evaluate import evaluate_pairs
from multihead.models import Seq2SeqConfig, Seq2SeqTransformer

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "translate-en-fr"


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "config.json").is_file():
        pytest.fail(f"the shipped model is missing from {SHIPPED}: run `make train-translate`")
    return demo.load(SHIPPED)


def test_shipped_model_scores_bleu_35_on_300_test_sentences(shipped):
    model, sp = shipped
    scores, rows = evaluate_pairs(model, sp, load_splits().test, limit=300, beam_size=1)
    assert scores.sentences == 300 == len(rows)
    assert scores.bleu >= 35.0, f"test BLEU {scores.bleu:.1f} (greedy, 300 sentences)"
    assert scores.chrf >= 50.0


def test_demo_writes_the_three_kinds_of_heatmap(shipped, tmp_path):
    model, sp = shipped
    written = demo.write_heatmaps(model, sp, "Where is the station?", tmp_path, beam_size=1)
    names = {path.name for path in written}
    assert {
        "encoder-self-attention.png",
        "decoder-self-attention.png",
        "cross-attention.png",
        "alignment.png",
    } <= names
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tiny_model_learns_from_real_pairs():
    """A few optimiser steps on real batches lower the loss on those batches."""
    torch.manual_seed(0)
    sp = load_tokenizer()
    config = Seq2SeqConfig(
        vocab_size=sp.get_piece_size(),
        d_model=32,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=64,
        dropout=0.0,
    )
    model = Seq2SeqTransformer(config)
    examples = encode_pairs(load_splits().train[:256], sp, config.max_len)
    batches = token_batches(examples, 1024, shuffle=False)[:4]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_on(batches) -> float:
        with torch.no_grad():
            return sum(
                F.cross_entropy(
                    model(b.src, b.tgt_in).flatten(0, 1), b.tgt_out.flatten(), ignore_index=PAD_ID
                ).item()
                for b in batches
            )

    before = loss_on(batches)
    for _ in range(8):
        for batch in batches:
            loss = F.cross_entropy(
                model(batch.src, batch.tgt_in).flatten(0, 1),
                batch.tgt_out.flatten(),
                ignore_index=PAD_ID,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert loss_on(batches) < 0.8 * before
