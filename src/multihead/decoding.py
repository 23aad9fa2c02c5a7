"""Decoding for any model built on the library's stacks: greedy or sampled, with KV caches.

`generate` runs the prompt through the model once (prefill: every layer's cache fills with
the prompt's keys and values), then one step per new token, feeding only that token. The
model is any ``step(ids, offset, caches) -> logits`` over a stack (`Encoder`, `DecoderOnly`)
whose ``new_caches`` builds the caches. `sample` picks each token from the last logits:
argmax (greedy), or a draw from softmax(logits / temperature) restricted to the ``top_k``
likeliest tokens and to the smallest set holding ``top_p`` of the probability (nucleus
sampling, Holtzman et al., 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["filter_logits", "generate", "sample"]

# step(ids (batch, new), offset = how many tokens the caches hold, caches) -> (batch, new, vocab)
Step = Callable[[Tensor, int, Any], Tensor]


class Stack(Protocol):
    """What `generate` needs of a stack: caches for its layers."""

    def new_caches(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device
    ) -> list[Any]: ...

    def parameters(self) -> Any: ...


def check_sampling(temperature: object, top_k: object, top_p: object, generator: object) -> None:
    """Sampling arguments: temperature >= 0 (0 = greedy), top_k >= 1, 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p restrict sampling: give a temperature > 0 with them")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def filter_logits(
    logits: Tensor, *, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """``logits`` (..., vocab) with -inf outside the top-k tokens and outside the nucleus:
    the likeliest tokens whose probabilities first reach ``top_p`` (the likeliest one always
    stays)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
        ranked = ranked.masked_fill(above >= top_p, -math.inf)
        logits = torch.empty_like(logits).scatter_(-1, order, ranked)
    return logits


def sample(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of each row of ``logits`` (batch, vocab) → (batch,): the argmax when
    ``temperature`` is 0, else a draw (reproducible with a seeded ``generator``)."""
    check_sampling(temperature, top_k, top_p, generator)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_ids(ids: object, max_new_tokens: object) -> Tensor:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must hold integer token ids, got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty (batch, prompt) tensor, got {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def generate(
    step: Step,
    ids: Tensor,
    *,
    max_new_tokens: int = 32,
    stack: Stack | None = None,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue the prompts ``ids`` (batch, prompt) → (batch, prompt + new tokens).

    With ``stack``, its ``new_caches`` holds every layer's keys and values: the prompt is
    run once, then each step feeds only the newest token. Without it, each step recomputes
    the whole prefix (a check on the caches, and for models without any). Once a row
    produces ``eos_id`` it is filled with eos; decoding stops when every row has. The model's
    mode is left alone: call it in eval mode.
    """
    ids = _check_ids(ids, max_new_tokens)
    check_sampling(temperature, top_k, top_p, generator)
    caches = None
    if stack is not None:
        weight = next(iter(stack.parameters()))
        caches = stack.new_caches(
            ids.shape[0], ids.shape[1] + max_new_tokens, dtype=weight.dtype, device=ids.device
        )
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    fed = 0  # how many tokens the caches hold
    for _ in range(max_new_tokens):
        logits = step(ids[:, fed:], fed, caches)
        if caches is not None:
            fed = ids.shape[1]
        token = sample(
            logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        ids = torch.cat([ids, token.unsqueeze(-1)], dim=1)
        if eos_id is not None and bool(finished.all()):  # decoding, not a forward pass
            break
    return ids
