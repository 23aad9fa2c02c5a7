"""The contenders of benchmarks/bench_seq2seq.py compute what they claim (no timing here).

Tiny models: the torch.nn.Transformer twin with our weights gives our logits and our greedy
translations; the torch.cat cache decodes the same tokens as the preallocated KVCache.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from multihead.apps.translate.data import Batch, pad
from multihead.models import LMConfig, Seq2SeqConfig, TransformerLM

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_seq2seq.py"

# the benchmark imports the translation app
pytest.importorskip("sacrebleu", reason="needs sacrebleu: pip install -e '.[apps]' (make setup)")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    saved = dict(os.environ)  # the script sets OMP_WAIT_POLICY for its own process
    sys.path.insert(0, str(BENCH.parent))  # the script imports bench_common by name
    try:
        spec = importlib.util.spec_from_file_location("bench_seq2seq", BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
        os.environ.clear()
        os.environ.update(saved)
    return module


def tiny_seq2seq(dropout: float = 0.0) -> Seq2SeqConfig:
    return Seq2SeqConfig(
        vocab_size=40,
        d_model=16,
        num_heads=2,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=32,
        dropout=dropout,
        max_len=24,
    )


def test_torch_twin_has_our_weights_and_logits(bench: ModuleType) -> None:
    ours, theirs = bench.build_pair(tiny_seq2seq(), seed=0)
    assert bench.parameter_count(ours) == bench.parameter_count(theirs)
    src = pad([[5, 6, 7, 2], [8, 9, 2]])
    tgt_in = pad([[1, 10, 11, 12], [1, 13]])
    tgt_out = pad([[10, 11, 12, 2], [13, 2]])
    batch = Batch(src, tgt_in, tgt_out)
    assert bench.max_logit_difference(ours, theirs, batch) < 1e-5
    ours.train(), theirs.train()  # training mode too (dropout 0): torch's slow path
    keep = tgt_out != 0
    with torch.no_grad():
        difference = (ours(src, tgt_in) - theirs(src, tgt_in))[keep].abs().max()
    assert float(difference) < 1e-5


def test_torch_greedy_matches_generate(bench: ModuleType) -> None:
    ours, theirs = bench.build_pair(tiny_seq2seq(), seed=1)
    src = pad([[5, 6, 7, 8, 2], [9, 2], [11, 12, 13, 2]])
    ours.eval()
    assert bench.torch_greedy(theirs, src, 12) == ours.generate(src, max_new_tokens=12)


def test_cat_cache_decodes_like_the_preallocated_cache(bench: ModuleType) -> None:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=2, max_len=32)
    model = TransformerLM(config).eval()
    ids = torch.randint(0, 50, (2, 5))
    expected = model.generate(ids, max_new_tokens=10)
    assert torch.equal(bench.generate_cat_cache(model, ids, 10), expected)
