"""English → French data: Tatoeba pairs, splits by English sentence, sentencepiece, batches.

Many English sentences have several French translations. The splits keep all of them
together (grouped by the English sentence, ignoring case and punctuation, so "Help me!" and
"Help me." land on the same side); splitting by line would put translations of a test
sentence into training. The test set keeps every reference for multi-reference BLEU.

One joint sentencepiece model (English and French share pieces such as names and numbers,
which lets the model tie its embeddings) is trained on the train split only.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...training.checkpoint import atomic_write
from ..shipped import DATA_VARIABLE, data_file

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor

__all__ = [
    "BOS_ID",
    "DATA_FILE",
    "EOS_ID",
    "PAD_ID",
    "SPM_MODEL",
    "UNK_ID",
    "Batch",
    "Example",
    "Splits",
    "build_vocab",
    "check_disjoint",
    "encode_pairs",
    "load_pairs",
    "load_splits",
    "load_tokenizer",
    "pad",
    "references",
    "split_key",
    "split_pairs",
    "spread_subset",
    "token_batches",
]

DATA_FILE = data_file("tatoeba-eng-fra.tsv.gz")
SPM_MODEL = data_file("translate", "spm.model")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
VOCAB_SIZE = 8000
SPLIT_SEED = 0
TEST_SIZE = 2000
VALID_SIZE = 1000

Pair = tuple[str, str]


def load_pairs(path: str | os.PathLike[str] = DATA_FILE) -> list[Pair]:
    """(english, french) pairs from a gzipped ``english<TAB>french`` file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the Tatoeba data ships with the package and in the "
            f"repository's data/ folder (or set {DATA_VARIABLE} to a folder holding it)"
        )
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ValueError(f"{path}:{number}: expected 'english<TAB>french', got {line!r}")
            pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def split_key(english: str) -> str:
    """The unit of the split: the sentence in lower case without punctuation."""
    return " ".join(re.sub(r"[^\w' ]+", " ", english.lower()).split())


@dataclass(frozen=True)
class Splits:
    """Train, valid and test pairs; no English sentence appears in two of them."""

    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]


def split_pairs(
    pairs: Sequence[Pair],
    *,
    seed: int = SPLIT_SEED,
    test_size: int = TEST_SIZE,
    valid_size: int = VALID_SIZE,
) -> Splits:
    """Shuffle the English sentences (by `split_key`) with ``seed``; the first ``test_size``
    go to test with all their translations, the next ``valid_size`` to valid, the rest to train.
    """
    for name, value in (("test_size", test_size), ("valid_size", valid_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    keys = sorted({split_key(english) for english, _ in pairs})
    if test_size + valid_size >= len(keys):
        raise ValueError(
            f"test_size + valid_size = {test_size + valid_size} leaves no training sentences "
            f"out of {len(keys)} distinct English sentences"
        )
    random.Random(seed).shuffle(keys)
    part = {key: "test" for key in keys[:test_size]}
    part.update({key: "valid" for key in keys[test_size : test_size + valid_size]})
    out: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    for pair in pairs:
        out[part.get(split_key(pair[0]), "train")].append(pair)
    splits = Splits(**out)
    check_disjoint(splits)
    return splits


def load_splits(path: str | os.PathLike[str] = DATA_FILE, *, seed: int = SPLIT_SEED) -> Splits:
    """The project's split of the shipped data: 2,000 test and 1,000 valid English sentences."""
    return split_pairs(load_pairs(path), seed=seed)


def check_disjoint(splits: Splits) -> None:
    """Raise ValueError if an English sentence (by `split_key`) is in two splits."""
    seen = {name: {split_key(e) for e, _ in getattr(splits, name)} for name in ("train", "valid")}
    seen["test"] = {split_key(e) for e, _ in splits.test}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        shared = seen[a] & seen[b]
        if shared:
            raise ValueError(
                f"{len(shared)} English sentences in both {a} and {b}, e.g. {min(shared)!r}"
            )


def references(pairs: Iterable[Pair]) -> list[tuple[str, list[str]]]:
    """Each distinct English sentence (first-seen order) with all of its French translations."""
    grouped: dict[str, list[str]] = {}
    for english, french in pairs:
        grouped.setdefault(english, []).append(french)
    return list(grouped.items())


def spread_subset(pairs: Sequence[Pair], sentences: int | None) -> list[Pair]:
    """The pairs of ``sentences`` English sentences spread evenly over ``pairs``.

    The data is sorted by length, so the first sentences would all be short ones.
    """
    grouped = references(pairs)
    if sentences is not None and sentences < len(grouped):
        if sentences <= 0:
            raise ValueError(f"sentences must be positive or None, got {sentences}")
        grouped = [grouped[i * len(grouped) // sentences] for i in range(sentences)]
    return [(english, french) for english, refs in grouped for french in refs]


# -- sentencepiece -----------------------------------------------------------------------------


def build_vocab(
    train_pairs: Sequence[Pair] | None = None,
    model_path: str | os.PathLike[str] = SPM_MODEL,
    *,
    vocab_size: int = VOCAB_SIZE,
    model_type: str = "unigram",
) -> Path:
    """Train the joint sentencepiece model on the train split and write it to ``model_path``.

    Deterministic: sorted distinct sentences, no sampling or shuffling, one thread.
    """
    import sentencepiece as spm

    if train_pairs is None:
        train_pairs = load_splits().train
    sentences = sorted({s for pair in train_pairs for s in pair})
    if not sentences:
        raise ValueError("train_pairs is empty: nothing to learn a vocabulary from")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(model_path, lambda tmp: tmp.write_bytes(model.getvalue()))
    return model_path


def load_tokenizer(model_path: str | os.PathLike[str] = SPM_MODEL) -> SentencePieceProcessor:
    """The sentencepiece model; checks it has the ids the models expect."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{model_path} not found: create it with "
            "`python -m multihead.apps.translate.data build-vocab`"
        )
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except RuntimeError:  # sentencepiece's only word for a file it cannot parse
        raise ValueError(f"{model_path} is not a sentencepiece model") from None
    ids = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
        raise ValueError(f"{model_path} has pad/bos/eos/unk ids {ids}, expected (0, 1, 2, 3)")
    return sp


# -- examples and batches ----------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One pair as ids: ``src`` ends with eos; ``tgt`` is bos … eos."""

    src: list[int]
    tgt: list[int]


def encode_pairs(
    pairs: Sequence[Pair], sp: SentencePieceProcessor, max_len: int = 128
) -> list[Example]:
    """Encode pairs; drop those longer than ``max_len`` tokens on either side."""
    src_ids = sp.encode([english for english, _ in pairs])
    tgt_ids = sp.encode([french for _, french in pairs])
    examples = []
    for src, tgt in zip(src_ids, tgt_ids, strict=True):
        example = Example(src + [EOS_ID], [BOS_ID, *tgt, EOS_ID])
        if len(example.src) <= max_len and len(example.tgt) - 1 <= max_len:
            examples.append(example)
    return examples


def pad(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> Tensor:
    """(batch, longest) long tensor, right-padded with ``pad_id``."""
    if not sequences:
        raise ValueError("pad needs at least one sequence")
    width = max(len(s) for s in sequences)
    return torch.tensor([[*s, *[pad_id] * (width - len(s))] for s in sequences], dtype=torch.long)


@dataclass(frozen=True)
class Batch:
    """Padded ids: source (B, S); decoder input bos…  and its shifted target …eos (B, T)."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor

    @property
    def tokens(self) -> int:
        """Real (non-pad) target tokens: what the loss averages over."""
        return int((self.tgt_out != PAD_ID).sum())


def token_batches(
    examples: Sequence[Example],
    max_tokens: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    max_sentences: int | None = None,
) -> list[Batch]:
    """Batches of similar-length examples, each at most ``max_tokens`` padded positions.

    Sorting by length (ties broken at random when ``shuffle``) keeps padding small; the
    batch order is then shuffled. Deterministic in (seed, epoch): the Trainer's resume relies
    on it. The budget counts batch size × the longer of the padded source and target.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if max_sentences is not None and max_sentences <= 0:
        raise ValueError(f"max_sentences must be positive or None, got {max_sentences}")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    noise = torch.rand(len(examples), generator=generator).tolist() if shuffle else None
    order = sorted(
        range(len(examples)),
        key=lambda i: (len(examples[i].src), len(examples[i].tgt), noise[i] if noise else i),
    )
    groups: list[list[Example]] = []
    current: list[Example] = []
    longest = 0
    for index in order:
        example = examples[index]
        length = max(len(example.src), len(example.tgt) - 1)
        if length > max_tokens:
            raise ValueError(f"an example has {length} tokens, more than max_tokens={max_tokens}")
        grown = max(longest, length)
        full = max_sentences is not None and len(current) >= max_sentences
        if current and (grown * (len(current) + 1) > max_tokens or full):
            groups.append(current)
            current, grown = [], length
        current.append(example)
        longest = grown
    if current:
        groups.append(current)
    if shuffle:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    return [
        Batch(
            src=pad([e.src for e in group]),
            tgt_in=pad([e.tgt[:-1] for e in group]),
            tgt_out=pad([e.tgt[1:] for e in group]),
        )
        for group in groups
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m multihead.apps.translate.data build-vocab``: (re)create spm.model."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["build-vocab", "stats"])
    parser.add_argument("--model", type=Path, default=SPM_MODEL)
    args = parser.parse_args(argv)
    splits = load_splits()
    if args.command == "build-vocab":
        print(f"wrote {build_vocab(splits.train, args.model)}")
    for name in ("train", "valid", "test"):
        pairs = getattr(splits, name)
        print(f"{name}: {len(pairs)} pairs, {len(references(pairs))} English sentences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
