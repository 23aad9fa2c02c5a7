"""CTC decoding: greedy (best path) and prefix beam search (best labelling).

Token 0 is the CTC blank; token d + 1 is digit d. Greedy decoding takes the most likely token
per frame, merges repeats and drops blanks. A labelling's probability is the sum over all of
its frame alignments, so the best single path need not spell the best labelling: prefix beam
search (Hannun et al., 2014) keeps the ``beam`` best prefixes and sums their alignments.
"""

from __future__ import annotations

import math
from collections import defaultdict

from torch import Tensor

__all__ = [
    "BLANK",
    "VOCAB_SIZE",
    "digits_to_tokens",
    "greedy_decode",
    "prefix_beam_search",
    "tokens_to_digits",
]

BLANK = 0
VOCAB_SIZE = 11  # blank + the digits 0-9
NEG_INF = -math.inf


def digits_to_tokens(digits: tuple[int, ...] | list[int]) -> list[int]:
    return [d + 1 for d in digits]


def tokens_to_digits(tokens: list[int]) -> list[int]:
    return [t - 1 for t in tokens if t != BLANK]


def _check(log_probs: object) -> Tensor:
    if not isinstance(log_probs, Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    if log_probs.ndim != 2:
        raise ValueError(
            f"log_probs must be 2-D (frames, tokens), got shape {tuple(log_probs.shape)}"
        )
    return log_probs


def greedy_decode(log_probs: Tensor, blank: int = BLANK) -> list[int]:
    """Best path: argmax per frame, merge repeats, drop blanks. ``log_probs``: (frames, tokens)."""
    best = _check(log_probs).argmax(-1).tolist()
    out, previous = [], None
    for token in best:
        if token != previous and token != blank:
            out.append(token)
        previous = token
    return out


def _logadd(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    top = max(a, b)
    return top + math.log1p(math.exp(-abs(a - b)))


def prefix_beam_search(
    log_probs: Tensor, beam: int = 8, blank: int = BLANK, prune: float = -12.0
) -> tuple[list[int], float]:
    """The most likely labelling within a beam, and its log probability.

    Each prefix carries two scores: alignments ending in blank and ending in its last token,
    because a repeated token only starts a new label after a blank. Tokens with log
    probability below ``prune`` at a frame are not extended (they cannot win).
    """
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be a positive int, got {beam!r}")
    frames = _check(log_probs).detach().double().cpu().tolist()
    # prefix -> (log P(alignments ending in blank), log P(alignments ending in a label))
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}
    for row in frames:
        candidates = [t for t, p in enumerate(row) if p >= prune or t == blank]
        grown: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
        for prefix, (p_blank, p_label) in beams.items():
            total = _logadd(p_blank, p_label)
            for token in candidates:
                p = row[token]
                if token == blank:
                    grown[prefix][0] = _logadd(grown[prefix][0], total + p)
                    continue
                extended = (*prefix, token)
                if prefix and token == prefix[-1]:
                    # "a" then "a" without a blank between stays "a" ...
                    grown[prefix][1] = _logadd(grown[prefix][1], p_label + p)
                    # ... and makes "aa" only from alignments that ended in blank.
                    grown[extended][1] = _logadd(grown[extended][1], p_blank + p)
                else:
                    grown[extended][1] = _logadd(grown[extended][1], total + p)
        ranked = sorted(grown.items(), key=lambda kv: _logadd(*kv[1]), reverse=True)
        beams = {prefix: (scores[0], scores[1]) for prefix, scores in ranked[:beam]}
    best, (p_blank, p_label) = max(beams.items(), key=lambda kv: _logadd(*kv[1]))
    return list(best), _logadd(p_blank, p_label)


def batch_decode(log_probs: Tensor, lengths: Tensor, beam: int | None = None) -> list[list[int]]:
    """Decode a batch (batch, frames, tokens) to digit lists; ``beam`` None means greedy."""
    out = []
    for b in range(log_probs.shape[0]):
        frames = log_probs[b, : int(lengths[b])]
        tokens = greedy_decode(frames) if beam is None else prefix_beam_search(frames, beam)[0]
        out.append(tokens_to_digits(tokens))
    return out
