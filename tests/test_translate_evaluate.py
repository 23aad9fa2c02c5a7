"""Scoring translations: multi-reference BLEU and chrF with a variable number of references."""

from __future__ import annotations

import pytest
from sacrebleu.metrics import BLEU

from multihead.apps.translate.evaluate import reference_streams, score


def test_reference_streams_pad_with_none() -> None:
    streams = reference_streams([["a"], ["b1", "b2", "b3"], ["c1", "c2"]])
    assert streams == [["a", "b1", "c1"], [None, "b2", "c2"], [None, "b3", None]]


def test_any_reference_can_match() -> None:
    refs = [["Je suis content.", "Je suis heureux."], ["Il pleut."]]
    perfect = score(["Je suis heureux.", "Il pleut."], refs)
    assert perfect.bleu == pytest.approx(100.0) and perfect.chrf == pytest.approx(100.0)
    assert perfect.sentences == 2 and "nrefs:var" in perfect.bleu_signature


def test_none_padding_is_not_an_empty_reference() -> None:
    # A short hypothesis: an empty reference would be the closest length and change BLEU.
    hypotheses = ["le chat est sur le tapis", "oui"]
    refs = [["le chat est sur le tapis", "le chat dort sur le tapis rouge"], ["oui oui merci"]]
    ours = score(hypotheses, refs).bleu
    with_empty = BLEU().corpus_score(hypotheses, [[r[0] for r in refs], [refs[0][1], ""]]).score
    alone = BLEU().corpus_score(hypotheses[1:], [["oui oui merci"]]).score
    assert ours != pytest.approx(with_empty)
    assert alone < ours < 100


def test_score_bad_input() -> None:
    with pytest.raises(ValueError, match="hypotheses"):
        score(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty list"):
        score(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        score(["a"], ["a"])  # type: ignore[list-item]
