"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

source ids → embedding·sqrt(d_model) + positions → Encoder → memory
target ids → embedding·sqrt(d_model) + positions → Decoder(·, memory) → logits

With ``share_embeddings`` (one joint vocabulary, as the paper's BPE) the source embedding,
target embedding and output projection are one matrix (§3.4). Generation is greedy or beam
search; both decode one token per step with a `KVCache` per decoder layer and project the
encoder memory once per layer into a `CrossAttentionCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention_config import AttentionConfig, model_attention
from ..cache import CrossAttentionCache, KVCache
from ..positional import LearnedPositions, SinusoidalPositions
from ..transformer import Decoder, Encoder
from .base import PretrainedMixin, check_token_ids

__all__ = ["Seq2SeqConfig", "Seq2SeqTransformer"]

Caches = tuple[list[KVCache], list[CrossAttentionCache]]


@dataclass
class Seq2SeqConfig:
    """Sizes and special token ids; the defaults are a small model (the paper's base: 512/8/6).

    ``positions`` are added to the embeddings ("sinusoidal", "learned") or not at all (None,
    when ``attention`` puts them inside attention). ``attention`` reaches every attention of
    both stacks: GQA, QK-norm, soft-capping, projection bias and positions ("rope", "alibi",
    "relative"; self-attention only, cross-attention has none). Its sliding window is
    refused: the encoder attends both ways. None (and configs saved before it existed) is
    the paper's attention.
    """

    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    dim_feedforward: int = 1024
    dropout: float = 0.1
    max_len: int = 128
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    norm_first: bool = True
    share_embeddings: bool = True
    positions: Literal["sinusoidal", "learned"] | None = "sinusoidal"
    attention: AttentionConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "dim_feedforward", "max_len"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} must be in [0, vocab_size={self.vocab_size}), got {value}"
                )
        if len(set(ids.values())) != 3:
            raise ValueError(f"pad_id, bos_id and eos_id must differ, got {ids}")
        self.attention = attention = model_attention(self.attention, self.num_heads)
        inside = None if attention is None else attention.positions
        if self.positions not in ("sinusoidal", "learned", None):
            raise ValueError(
                f"positions must be 'sinusoidal', 'learned' or None, got {self.positions!r}"
            )
        if self.positions is None and inside is None:
            raise ValueError(
                "positions=None needs positions inside attention (attention=AttentionConfig("
                "positions='rope', 'alibi' or 'relative')): without either the encoder "
                "cannot tell word order"
            )


class Seq2SeqTransformer(PretrainedMixin, nn.Module):
    """Encoder-decoder Transformer for translation-like tasks; padding is ``pad_id``."""

    config_class = Seq2SeqConfig

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")
        self.config = c = config
        if c.share_embeddings:
            self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        else:
            self.src_embedding = nn.Embedding(c.vocab_size, c.d_model)
            self.tgt_embedding = nn.Embedding(c.vocab_size, c.d_model)
            self.generator = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.positions: SinusoidalPositions | LearnedPositions | None = None
        if c.positions == "sinusoidal":
            self.positions = SinusoidalPositions(c.d_model, c.max_len)
        elif c.positions == "learned":
            self.positions = LearnedPositions(c.d_model, c.max_len)
        self.dropout = nn.Dropout(c.dropout)
        stack = (c.d_model, c.num_heads, c.dim_feedforward, c.dropout)
        options = {"norm_first": c.norm_first, "attention": c.attention}
        self.encoder = Encoder(c.num_encoder_layers, *stack, **options)
        self.decoder = Decoder(c.num_decoder_layers, *stack, **options)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for the layers' matrices (as nn.Transformer); embeddings N(0, 1/d_model).

        With the sqrt(d_model) scale the embedded tokens then have unit variance.
        """
        for p in (*self.encoder.parameters(), *self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, nn.Embedding) and module.num_embeddings == self.config.vocab_size:
                nn.init.normal_(module.weight, std=self.config.d_model**-0.5)
        if not self.config.share_embeddings:
            nn.init.normal_(self.generator.weight, std=self.config.d_model**-0.5)

    # -- the pieces --------------------------------------------------------------------------
    def _check_ids(self, name: str, ids: object) -> Tensor:
        """`check_token_ids`: the range check is skipped while compiling."""
        return check_token_ids(name, ids, self.config.vocab_size, next(self.parameters()))

    def _embed(self, ids: Tensor, side: Literal["src", "tgt"], offset: int = 0) -> Tensor:
        """Token embedding · sqrt(d_model) + position, then dropout (§3.4, §5.4)."""
        if self.config.share_embeddings:
            table = self.embedding
        else:
            table = self.src_embedding if side == "src" else self.tgt_embedding
        x = table(ids) * math.sqrt(self.config.d_model)
        if self.positions is not None:
            x = self.positions(x, offset)
        return self.dropout(x)

    def _logits(self, h: Tensor) -> Tensor:
        if self.config.share_embeddings:
            return F.linear(h, self.embedding.weight)
        return self.generator(h)

    @staticmethod
    def _key_mask(keep: Tensor, q_len: int) -> Tensor:
        """(batch, k_len) True = real token → (batch, 1, q_len, k_len), True = may attend."""
        return keep[:, None, None, :].expand(-1, 1, q_len, -1)

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Source ids (B, S) → memory (B, S, d_model) and src_mask (B, S), True = real token."""
        src_ids = self._check_ids("src_ids", src_ids)
        src_mask = src_ids != self.config.pad_id
        x = self._embed(src_ids, "src")
        return self.encoder(x, mask=self._key_mask(src_mask, src_ids.shape[1])), src_mask

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor,
        src_mask: Tensor,
        *,
        tgt_mask: Tensor | None = None,
        offset: int = 0,
        caches: Caches | None = None,
    ) -> Tensor:
        """Target ids (B, T) at positions offset.. → logits (B, T, vocab); always causal."""
        x = self._embed(tgt_ids, "tgt", offset)
        self_caches, cross_caches = caches if caches is not None else (None, None)
        h = self.decoder(
            x,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=self._key_mask(src_mask, tgt_ids.shape[1]),
            self_caches=self_caches,
            cross_caches=cross_caches,
        )
        return self._logits(h)

    def forward(self, src_ids: Tensor, tgt_in_ids: Tensor) -> Tensor:
        """Teacher forcing: (B, S) source and (B, T) shifted target ids → logits (B, T, V)."""
        memory, src_mask = self.encode(src_ids)
        tgt_in_ids = self._check_ids("tgt_in_ids", tgt_in_ids)
        if tgt_in_ids.shape[0] != src_ids.shape[0]:
            raise ValueError(
                f"tgt_in_ids has batch size {tgt_in_ids.shape[0]} but src_ids has "
                f"{src_ids.shape[0]}"
            )
        keep = tgt_in_ids != self.config.pad_id
        return self.decode(
            tgt_in_ids, memory, src_mask, tgt_mask=self._key_mask(keep, tgt_in_ids.shape[1])
        )

    # -- generation --------------------------------------------------------------------------
    def new_caches(self, batch_size: int, max_len: int, like: Tensor) -> Caches:
        """Empty caches for every decoder layer: a KVCache each and a CrossAttentionCache each."""
        self_caches = [
            KVCache(
                batch_size,
                layer.self_attn.num_kv_heads,
                max_len,
                layer.self_attn.head_dim,
                dtype=like.dtype,
                device=like.device,
            )
            for layer in self.decoder.layers
        ]
        return self_caches, [CrossAttentionCache() for _ in self.decoder.layers]

    def _next_log_probs(
        self, tokens: Tensor, memory: Tensor, src_mask: Tensor, caches: Caches | None
    ) -> Tensor:
        """Log-probabilities (rows, V) of the token after ``tokens``; the cache feeds only the
        newest token, without it the whole prefix is recomputed."""
        if caches is None:
            logits = self.decode(tokens, memory, src_mask)
        else:
            step = tokens.shape[1] - 1
            logits = self.decode(tokens[:, -1:], memory, src_mask, offset=step, caches=caches)
        return F.log_softmax(logits[:, -1].float(), dim=-1)

    def _never_generate(self, log_probs: Tensor) -> Tensor:
        """Padding and bos are not outputs: they are never chosen (their log-probs stay)."""
        special = torch.tensor([self.config.pad_id, self.config.bos_id], device=log_probs.device)
        return log_probs.index_fill(-1, special, -math.inf)

    def _strip(self, ids: list[int]) -> list[int]:
        c = self.config
        if c.eos_id in ids:
            ids = ids[: ids.index(c.eos_id)]
        return [i for i in ids if i not in (c.pad_id, c.bos_id)]

    @overload
    def generate(
        self,
        src_ids: Tensor,
        *,
        max_new_tokens: int = ...,
        beam_size: int = ...,
        length_penalty: float = ...,
        use_cache: bool = ...,
        return_scores: Literal[False] = ...,
    ) -> list[list[int]]: ...

    @overload
    def generate(
        self,
        src_ids: Tensor,
        *,
        max_new_tokens: int = ...,
        beam_size: int = ...,
        length_penalty: float = ...,
        use_cache: bool = ...,
        return_scores: Literal[True],
    ) -> tuple[list[list[int]], list[float]]: ...

    @torch.no_grad()
    def generate(
        self,
        src_ids: Tensor,
        *,
        max_new_tokens: int = 64,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
        return_scores: bool = False,
    ) -> list[list[int]] | tuple[list[list[int]], list[float]]:
        """Translate each source row: greedy (beam_size=1) or beam search.

        Returns token ids without bos/eos/pad, at most ``min(max_new_tokens, max_len)`` per
        row (eos included in the count). With ``return_scores`` also each sequence's total
        log-probability (eos included); beam search ranks finished hypotheses by that total
        divided by length**length_penalty. ``use_cache=False`` recomputes the whole prefix at
        every step (slow; for tests and benchmarks). Runs in eval mode, then restores the
        previous mode.
        """
        src_ids = self._check_ids("src_ids", src_ids)
        for name, value in (("max_new_tokens", max_new_tokens), ("beam_size", beam_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if not isinstance(length_penalty, int | float):
            raise TypeError(f"length_penalty must be a number, got {type(length_penalty).__name__}")
        steps = min(max_new_tokens, self.config.max_len)
        if steps == 0:
            empty: list[list[int]] = [[] for _ in range(src_ids.shape[0])]
            return (empty, [0.0] * len(empty)) if return_scores else empty
        was_training = self.training
        self.eval()
        try:
            if beam_size == 1:
                tokens, scores = self._greedy(src_ids, steps, use_cache)
            else:
                tokens, scores = self._beam_search(
                    src_ids, steps, beam_size, float(length_penalty), use_cache
                )
        finally:
            self.train(was_training)
        return (tokens, scores) if return_scores else tokens

    @torch.no_grad()
    def _greedy(
        self, src_ids: Tensor, steps: int, use_cache: bool
    ) -> tuple[list[list[int]], list[float]]:
        """Take the most probable token at each step until every row has produced eos."""
        c = self.config
        memory, src_mask = self.encode(src_ids)
        batch = src_ids.shape[0]
        tokens = src_ids.new_full((batch, 1), c.bos_id)
        scores = torch.zeros(batch, device=src_ids.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=src_ids.device)
        caches = self.new_caches(batch, steps, memory) if use_cache else None
        for _ in range(steps):
            log_probs = self._next_log_probs(tokens, memory, src_mask, caches)
            next_token = self._never_generate(log_probs).argmax(-1)
            step_score = log_probs.gather(-1, next_token.unsqueeze(-1)).squeeze(-1)
            scores += step_score.masked_fill(finished, 0.0)
            next_token = next_token.masked_fill(finished, c.pad_id)
            tokens = torch.cat([tokens, next_token.unsqueeze(-1)], dim=1)
            finished |= next_token == c.eos_id
            if bool(finished.all()):
                break
        return [self._strip(row) for row in tokens[:, 1:].tolist()], scores.tolist()

    @torch.no_grad()
    def _beam_search(
        self, src_ids: Tensor, steps: int, beam_size: int, length_penalty: float, use_cache: bool
    ) -> tuple[list[list[int]], list[float]]:
        """Keep the ``beam_size`` best prefixes per source; all sources advance as one batch.

        Row b·K + k holds beam k of source b. Each step scores all K·V continuations, sets
        aside those ending in eos (if ranked in the top K) as finished, and keeps the K best
        others. A source is done when it has K finished hypotheses and no live beam can beat
        the worst of them at the current length.
        """
        c, k = self.config, beam_size
        memory, src_mask = self.encode(src_ids)
        batch, device = src_ids.shape[0], src_ids.device
        # The beams of one source share its memory, so the cross-attention caches never need
        # reordering: beam search only moves rows within a source.
        memory = memory.repeat_interleave(k, dim=0)
        src_mask = src_mask.repeat_interleave(k, dim=0)
        tokens = src_ids.new_full((batch * k, 1), c.bos_id)
        beam_scores = torch.full((batch, k), -math.inf, device=device)
        beam_scores[:, 0] = 0.0  # at the start all beams are the same prefix: keep one
        finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        caches = self.new_caches(batch * k, steps, memory) if use_cache else None
        rows = torch.arange(batch, device=device).unsqueeze(1) * k
        for step in range(steps):
            log_probs = self._next_log_probs(tokens, memory, src_mask, caches)
            vocab = log_probs.shape[-1]
            log_probs = self._never_generate(log_probs)
            candidates = (beam_scores.unsqueeze(-1) + log_probs.view(batch, k, vocab)).view(
                batch, k * vocab
            )
            top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)
            top_beam, top_token = top_index // vocab, top_index % vocab
            is_eos = top_token == c.eos_id
            length = step + 1  # generated tokens, eos included
            ends = is_eos[:, :k] & torch.isfinite(top_scores[:, :k])
            for b, rank in ends.nonzero().tolist():
                if not done[b]:
                    raw = float(top_scores[b, rank])
                    prefix = tokens[b * k + int(top_beam[b, rank]), 1:].tolist()
                    finished[b].append((raw / length**length_penalty, raw, prefix))
            beam_scores, pick = top_scores.masked_fill(is_eos, -math.inf).topk(k, dim=-1)
            source_rows = (rows + top_beam.gather(1, pick)).view(-1)
            tokens = torch.cat([tokens[source_rows], top_token.gather(1, pick).view(-1, 1)], 1)
            if caches is not None:
                for cache in caches[0]:
                    cache.reorder(source_rows)
            for b in range(batch):
                if done[b] or len(finished[b]) < k:
                    continue
                finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:k]
                best_live = float(beam_scores[b, 0]) / length**length_penalty
                done[b] = finished[b][-1][0] >= best_live
            if all(done):
                break
        length = tokens.shape[1] - 1
        for b in range(batch):
            if not done[b]:  # out of steps: the live beams count as finished
                for j in range(k):
                    raw = float(beam_scores[b, j])
                    if math.isfinite(raw):
                        prefix = tokens[b * k + j, 1:].tolist()
                        finished[b].append((raw / max(length, 1) ** length_penalty, raw, prefix))
        best = [max(hyps, key=lambda h: h[0]) if hyps else (0.0, 0.0, []) for hyps in finished]
        return [self._strip(ids) for _, _, ids in best], [raw for _, raw, _ in best]
