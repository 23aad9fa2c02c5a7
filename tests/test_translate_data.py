"""Translation data: splits by English sentence, references grouped, spm, length buckets."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from multihead.apps.translate.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Example,
    Splits,
    check_disjoint,
    load_pairs,
    load_splits,
    load_tokenizer,
    pad,
    references,
    split_key,
    split_pairs,
    token_batches,
)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return load_pairs()


@pytest.fixture(scope="module")
def splits(pairs) -> Splits:
    return split_pairs(pairs)


def test_shipped_data(pairs) -> None:
    assert len(pairs) == 76_037
    assert len({english for english, _ in pairs}) == 49_197


def test_splits_are_disjoint_by_english_sentence(pairs, splits: Splits) -> None:
    english = {name: {e for e, _ in getattr(splits, name)} for name in ("train", "valid", "test")}
    assert not english["train"] & english["valid"]
    assert not english["train"] & english["test"]
    assert not english["valid"] & english["test"]
    # Also after normalisation: "Help me!" and "Help me." are one sentence.
    keys = {name: {split_key(e) for e in sentences} for name, sentences in english.items()}
    assert not keys["train"] & (keys["valid"] | keys["test"])
    assert not keys["valid"] & keys["test"]
    assert len(splits.train) + len(splits.valid) + len(splits.test) == len(pairs)
    check_disjoint(splits)


def test_split_sizes_and_determinism(pairs, splits: Splits) -> None:
    assert len(references(splits.test)) >= 2000
    assert 1000 <= len(references(splits.valid)) < 1100
    assert split_pairs(pairs) == splits
    assert split_pairs(pairs, seed=1).test != splits.test


def test_all_references_of_a_test_sentence_are_grouped(pairs, splits: Splits) -> None:
    per_english = Counter(english for english, _ in pairs)
    grouped = references(splits.test)
    assert len(grouped) == len({e for e, _ in splits.test})
    for english, refs in grouped:
        assert len(refs) == per_english[english]
    assert max(len(refs) for _, refs in grouped) > 1
    example = next((e, refs) for e, refs in grouped if len(refs) > 2)
    assert sorted(example[1]) == sorted(f for e, f in pairs if e == example[0])


def test_check_disjoint_catches_a_leak(splits: Splits) -> None:
    leaky = Splits(splits.train, splits.valid, splits.test + [splits.train[0]])
    with pytest.raises(ValueError, match="train and test"):
        check_disjoint(leaky)
    with pytest.raises(ValueError, match="no training sentences"):
        split_pairs([("a", "b"), ("c", "d")], test_size=1, valid_size=1)


def test_spm_round_trips_and_special_ids() -> None:
    sp = load_tokenizer()
    assert sp.get_piece_size() == 8000
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    for sentence in ["Je ne sais pas de quoi tu parles.", "I don't know what you're saying."]:
        ids = sp.encode(sentence)
        assert UNK_ID not in ids
        assert sp.decode(ids) == sentence


def _examples(lengths: list[tuple[int, int]]) -> list[Example]:
    return [
        Example([5 + i] * s + [EOS_ID], [BOS_ID, *[7 + i] * t, EOS_ID])
        for i, (s, t) in enumerate(lengths)
    ]


def test_bucketing_pads_with_pad_id_and_respects_the_budget() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (200, 2), generator=generator).tolist()
    examples = _examples(lengths)
    batches = token_batches(examples, max_tokens=64, seed=3, epoch=1)
    seen = 0
    for batch in batches:
        rows, width = batch.src.shape
        assert rows * max(width, batch.tgt_in.shape[1]) <= 64
        assert batch.tgt_in.shape == batch.tgt_out.shape
        for row in range(rows):
            src = batch.src[row]
            real = int((src != PAD_ID).sum())
            assert src[real - 1] == EOS_ID and torch.all(src[real:] == PAD_ID)
            tgt_in, tgt_out = batch.tgt_in[row], batch.tgt_out[row]
            n = int((tgt_out != PAD_ID).sum())
            assert tgt_in[0] == BOS_ID and tgt_out[n - 1] == EOS_ID
            assert torch.equal(tgt_in[1:n], tgt_out[: n - 1])  # shifted by one
            assert torch.all(tgt_in[n:] == PAD_ID) and torch.all(tgt_out[n:] == PAD_ID)
        seen += rows
    assert seen == len(examples)
    # Similar lengths together: far less padding than random batches of the same size.
    padded = sum(b.src.numel() for b in batches)
    assert padded < 1.3 * sum(len(e.src) for e in examples)
    again = token_batches(examples, max_tokens=64, seed=3, epoch=1)
    assert all(torch.equal(a.src, b.src) for a, b in zip(batches, again, strict=True))
    other = token_batches(examples, max_tokens=64, seed=3, epoch=2)
    assert [b.src.shape for b in other] != [b.src.shape for b in batches]


def test_bucketing_bad_input() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        token_batches(_examples([(3, 3)]), max_tokens=0)
    with pytest.raises(ValueError, match="more than max_tokens"):
        token_batches(_examples([(30, 3)]), max_tokens=8)
    assert pad([[1, 2, 3], [4]]).tolist() == [[1, 2, 3], [4, PAD_ID, PAD_ID]]


def test_load_splits_is_the_project_split(splits: Splits) -> None:
    assert load_splits() == splits
