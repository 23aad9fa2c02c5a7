"""Seq2SeqTransformer and TransformerLM: shapes, masking, generation, save/load, training."""

import json

import pytest
import torch
import torch.nn.functional as F

from multihead.models import LMConfig, Seq2SeqConfig, Seq2SeqTransformer, TransformerLM

VOCAB = 12


def small_config(**overrides) -> Seq2SeqConfig:
    fields = dict(
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=64,
        max_len=24,
        dropout=0.0,
    )
    fields.update(overrides)
    return Seq2SeqConfig(**fields)


def random_model() -> tuple[Seq2SeqTransformer, torch.Tensor]:
    """A random model whose outputs vary: untied, with a sharpened output layer.

    (A random tied model mostly repeats its input token; this one ends rows at different
    steps and its beam search disagrees with greedy, so the comparisons below mean something.)
    """
    torch.manual_seed(5)
    model = Seq2SeqTransformer(small_config(share_embeddings=False)).eval()
    with torch.no_grad():
        model.generator.weight.mul_(5)
    src = torch.randint(3, VOCAB, (4, 7))
    src[1, 5:] = 0  # padding
    return model, src


def test_forward_shape_and_padding_is_invisible() -> None:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(small_config()).eval()
    src = torch.randint(3, VOCAB, (2, 5))
    tgt = torch.randint(3, VOCAB, (2, 4))
    logits = model(src, tgt)
    assert logits.shape == (2, 4, VOCAB)
    padded = model(F.pad(src, (0, 3), value=0), F.pad(tgt, (0, 2), value=0))
    torch.testing.assert_close(padded[:, :4], logits, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_argument() -> None:
    model = Seq2SeqTransformer(small_config())
    with pytest.raises(TypeError, match="src_ids"):
        model(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tgt_in_ids.*vocab_size"):
        model(torch.ones(1, 3, dtype=torch.long), torch.full((1, 2), VOCAB))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 30, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model"):
        small_config(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="must differ"):
        small_config(eos_id=0)


def test_greedy_with_cache_equals_recompute() -> None:
    model, src = random_model()
    tokens, scores = model.generate(src, max_new_tokens=12, return_scores=True)
    assert len({len(t) for t in tokens}) > 1  # rows end at different steps
    again, again_scores = model.generate(
        src, max_new_tokens=12, return_scores=True, use_cache=False
    )
    assert tokens == again
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(again_scores), atol=1e-4, rtol=0)
    for row, (ids, score) in enumerate(zip(tokens, scores, strict=True)):
        assert score == pytest.approx(sequence_log_prob(model, src[row], ids, 12), abs=1e-4)


def test_beam_search_with_cache_equals_recompute() -> None:
    model, src = random_model()
    tokens, scores = model.generate(src, max_new_tokens=12, beam_size=4, return_scores=True)
    again, again_scores = model.generate(
        src, max_new_tokens=12, beam_size=4, return_scores=True, use_cache=False
    )
    assert tokens == again
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(again_scores), atol=1e-4, rtol=0)
    assert tokens != model.generate(src, max_new_tokens=12)  # the beams matter here
    for row, (ids, score) in enumerate(zip(tokens, scores, strict=True)):
        assert score == pytest.approx(sequence_log_prob(model, src[row], ids, 12), abs=1e-4)


def sequence_log_prob(model: Seq2SeqTransformer, src: torch.Tensor, ids: list[int], steps: int):
    """log P(ids [+ eos] | src) by teacher forcing: what generate's score must be."""
    target = ids + [2] if len(ids) < steps else ids
    logits = model(src.unsqueeze(0), torch.tensor([[1, *target[:-1]]]))
    log_probs = logits.log_softmax(-1)[0, torch.arange(len(target)), torch.tensor(target)]
    return log_probs.sum().item()


def test_beam_search_of_one_beam_is_greedy() -> None:
    model, src = random_model()
    greedy, greedy_scores = model.generate(src, max_new_tokens=12, return_scores=True)
    beam, beam_scores = model._beam_search(src, 12, 1, 1.0, True)
    assert beam == greedy
    torch.testing.assert_close(torch.tensor(beam_scores), torch.tensor(greedy_scores))


def test_generate_outputs_no_special_tokens_and_restores_training_mode() -> None:
    model, src = random_model()
    model.train()
    out = model.generate(src, max_new_tokens=30)  # capped at max_len
    assert model.training
    assert all(len(row) <= model.config.max_len for row in out)
    assert all(t not in (0, 1, 2) for row in out for t in row)
    assert model.generate(src, max_new_tokens=0) == [[]] * 4
    with pytest.raises(ValueError, match="beam_size"):
        model.generate(src, beam_size=0)


@pytest.mark.parametrize(
    "overrides", [{}, {"share_embeddings": False, "positions": "learned", "norm_first": False}]
)
def test_save_and_load_give_identical_outputs(tmp_path, overrides) -> None:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(small_config(**overrides)).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == VOCAB
    loaded = Seq2SeqTransformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    src, tgt = torch.randint(3, VOCAB, (2, 5)), torch.randint(3, VOCAB, (2, 4))
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), atol=0, rtol=0)
    assert loaded.generate(src, max_new_tokens=6) == model.generate(src, max_new_tokens=6)


def test_from_pretrained_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        Seq2SeqTransformer.from_pretrained(tmp_path)
    Seq2SeqTransformer(small_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Seq2SeqTransformer.from_pretrained(tmp_path)
    (tmp_path / "other.safetensors").rename(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dim_feedforward": 48}))
    with pytest.raises(ValueError, match=r"linear1.weight has shape \(64, 32\)"):
        Seq2SeqTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        Seq2SeqTransformer.from_pretrained(tmp_path)


def test_copy_task_loss_falls() -> None:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        small_config(num_encoder_layers=1, num_decoder_layers=1, max_len=16)
    ).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        src = torch.randint(3, VOCAB, (32, 6))
        tgt_in = F.pad(src, (1, 0), value=1)  # bos + copy
        tgt_out = F.pad(src, (0, 1), value=2)  # copy + eos
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt_out.reshape(-1), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_lm_cached_generation_equals_recompute(tmp_path) -> None:
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        num_layers=2,
        dim_feedforward=64,
        max_len=20,
        num_kv_heads=2,
    )
    model = TransformerLM(config).eval()
    with torch.no_grad():
        model.embedding.weight.normal_(std=1.0)  # a sharper random model: varied tokens
    prompt = torch.randint(0, VOCAB, (3, 4))
    cached = model.generate(prompt, max_new_tokens=12)
    assert cached.shape == (3, 16) and torch.equal(cached[:, :4], prompt)
    assert len(set(cached[:, 4:].flatten().tolist())) > 2
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=12, use_cache=False))
    logits = model(cached)
    assert logits.shape == (3, 16, VOCAB)
    assert torch.equal(logits[:, 3:-1].argmax(-1), cached[:, 4:])  # greedy = argmax of forward
    with pytest.raises(ValueError, match="max_len=20"):
        model.generate(prompt, max_new_tokens=20)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(TransformerLM.from_pretrained(tmp_path)(prompt), model(prompt))
