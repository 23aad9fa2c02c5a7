"""Translate sentences with a trained model and score them with sacrebleu (BLEU, chrF).

Each test English sentence is translated once and scored against all of its French
translations. sacrebleu takes references as *streams* (stream j holds the j-th reference of
every sentence); a sentence with fewer references gets ``None`` in the streams it lacks,
which sacrebleu documents for a variable number of references and drops before scoring
(its signature then says ``nrefs:var``). Padding with ``''`` would not do: an empty string
is kept as a real reference of length 0 and can change BLEU's closest reference length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sacrebleu.metrics import BLEU, CHRF

from ...models import Seq2SeqTransformer
from .data import EOS_ID, Pair, pad, references, spread_subset

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor

__all__ = ["Scores", "evaluate_pairs", "reference_streams", "score", "translate"]


def reference_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-sentence reference lists → sacrebleu reference streams, padded with ``None``."""
    if not refs:
        raise ValueError("no sentences to score")
    for index, sentence_refs in enumerate(refs):
        if isinstance(sentence_refs, str) or not sentence_refs:
            raise ValueError(
                f"sentence {index} must have a non-empty list of references, got {sentence_refs!r}"
            )
    width = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


@dataclass(frozen=True)
class Scores:
    """Corpus BLEU and chrF, with the number of sentences and sacrebleu's signatures."""

    bleu: float
    chrf: float
    sentences: int
    bleu_signature: str
    chrf_signature: str

    def __str__(self) -> str:
        return (
            f"BLEU {self.bleu:.2f}  chrF {self.chrf:.2f}  on {self.sentences} sentences  "
            f"({self.bleu_signature})"
        )


def score(hypotheses: Sequence[str], refs: Sequence[Sequence[str]]) -> Scores:
    """Corpus BLEU (13a tokenisation) and chrF of detokenized ``hypotheses`` against ``refs``."""
    if len(hypotheses) != len(refs):
        raise ValueError(f"{len(hypotheses)} hypotheses but references for {len(refs)} sentences")
    streams = reference_streams(refs)
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), streams)  # type: ignore[arg-type]
    chrf_score = chrf.corpus_score(list(hypotheses), streams)  # type: ignore[arg-type]
    return Scores(
        bleu=bleu_score.score,
        chrf=chrf_score.score,
        sentences=len(hypotheses),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )


def translate(
    model: Seq2SeqTransformer,
    sp: SentencePieceProcessor,
    sentences: Sequence[str],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 128,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Translate English ``sentences`` to detokenized French, in the given order.

    Sentences are decoded in batches of similar length (less padding, earlier stop).
    ``max_new_tokens`` defaults to twice the source length plus 10 per batch.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a sequence of strings, not one string")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_len = model.config.max_len
    sources = [ids[: max_len - 1] + [EOS_ID] for ids in sp.encode(list(sentences))]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src = pad([sources[i] for i in chunk])
        limit = max_new_tokens or 2 * src.shape[1] + 10
        ids = model.generate(
            src, max_new_tokens=limit, beam_size=beam_size, length_penalty=length_penalty
        )
        for index, hypothesis in zip(chunk, sp.decode(ids), strict=True):
            out[index] = hypothesis
    return out


def evaluate_pairs(
    model: Seq2SeqTransformer,
    sp: SentencePieceProcessor,
    pairs: Sequence[Pair],
    *,
    limit: int | None = None,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 128,
) -> tuple[Scores, list[tuple[str, str, list[str]]]]:
    """Translate each distinct English sentence of ``pairs`` and score against all references.

    ``limit`` keeps that many sentences spread over ``pairs`` (`spread_subset`). Returns the
    scores and (source, hypothesis, references) for each sentence.
    """
    grouped = references(spread_subset(pairs, limit))
    hypotheses = translate(
        model,
        sp,
        [english for english, _ in grouped],
        beam_size=beam_size,
        length_penalty=length_penalty,
        batch_size=batch_size,
    )
    scores = score(hypotheses, [refs for _, refs in grouped])
    rows = [(e, h, refs) for (e, refs), h in zip(grouped, hypotheses, strict=True)]
    return scores, rows
