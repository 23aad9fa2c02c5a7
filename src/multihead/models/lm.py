"""A decoder-only Transformer language model (GPT): causal self-attention blocks only.

ids → embedding + positions → causal EncoderLayers → final norm → logits (tied to the
embedding by default). Generation is greedy and decodes one token per step with a KVCache
per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache
from ..positional import LearnedPositions, SinusoidalPositions
from ..transformer import Encoder
from .base import PretrainedMixin, check_token_ids

__all__ = ["LMConfig", "TransformerLM"]


@dataclass
class LMConfig:
    """Sizes of a small GPT; ``eos_id`` (optional) stops generation early."""

    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    max_len: int = 256
    norm_first: bool = True
    tie_embeddings: bool = True
    positions: Literal["sinusoidal", "learned"] = "learned"
    activation: Literal["relu", "gelu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    num_kv_heads: int | None = None
    eos_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "dim_feedforward",
                     "max_len"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {self.positions!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise TypeError(f"dropout must be a number, got {type(self.dropout).__name__}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        kv = self.num_kv_heads
        if kv is not None and (
            isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or self.num_heads % kv
        ):
            raise ValueError(
                f"num_kv_heads must be None or a positive divisor of num_heads "
                f"({self.num_heads}), got {kv!r}"
            )
        if self.eos_id is not None and (
            isinstance(self.eos_id, bool) or not isinstance(self.eos_id, int)
        ):
            raise TypeError(f"eos_id must be an int or None, got {self.eos_id!r}")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(
                f"eos_id must be in [0, vocab_size={self.vocab_size}), got {self.eos_id}"
            )


class TransformerLM(PretrainedMixin, nn.Module):
    """Next-token prediction with causal self-attention."""

    config_class = LMConfig

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.positions: SinusoidalPositions | LearnedPositions = (
            SinusoidalPositions(c.d_model, c.max_len)
            if c.positions == "sinusoidal"
            else LearnedPositions(c.d_model, c.max_len)
        )
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = Encoder(
            c.num_layers, c.d_model, c.num_heads, c.dim_feedforward, c.dropout,
            activation=c.activation, norm=c.norm, norm_first=c.norm_first,
            num_kv_heads=c.num_kv_heads,
        )  # fmt: skip
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(
        self, ids: Tensor, *, offset: int = 0, caches: list[KVCache] | None = None
    ) -> Tensor:
        """ids (B, T) at positions offset.. → logits (B, T, vocab). Always causal."""
        check_token_ids("ids", ids, self.config.vocab_size, self.embedding.weight)
        x = self.dropout(self.positions(self.embedding(ids), offset))
        h = self.blocks(x, causal=True, caches=caches)
        return F.linear(h, self.embedding.weight) if self.head is None else self.head(h)

    def new_caches(self, batch_size: int, max_len: int, like: Tensor) -> list[KVCache]:
        """One empty KVCache per block."""
        return [
            KVCache(
                batch_size,
                block.self_attn.num_kv_heads,
                max_len,
                block.self_attn.head_dim,
                dtype=like.dtype,
                device=like.device,
            )
            for block in self.blocks.layers
        ]

    @torch.no_grad()
    def generate(self, ids: Tensor, *, max_new_tokens: int = 32, use_cache: bool = True) -> Tensor:
        """Greedy continuation of the prompts ``ids`` (B, P) → (B, P + new tokens).

        Stops early once every row has produced ``eos_id`` (rows that ended are filled with
        eos). The prompt plus the new tokens must fit in max_len. ``use_cache=False``
        recomputes the prefix each step (for tests and benchmarks).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_token_ids("ids", ids, self.config.vocab_size, self.embedding.weight)
        if ids.shape[1] == 0:
            raise ValueError(
                f"ids must be a non-empty (batch, prompt) tensor, got {tuple(ids.shape)}"
            )
        total = ids.shape[1] + max_new_tokens
        if total - 1 > self.config.max_len:  # the last new token is never fed back
            raise ValueError(
                f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_len={self.config.max_len}"
            )
        eos = self.config.eos_id
        was_training = self.training
        self.eval()
        try:
            caches = (
                self.new_caches(ids.shape[0], total, self.embedding.weight) if use_cache else None
            )
            finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            fed = 0  # how many tokens the caches hold
            for _ in range(max_new_tokens):
                if caches is None:
                    logits = self(ids)
                else:
                    logits = self(ids[:, fed:], offset=fed, caches=caches)
                    fed = ids.shape[1]
                next_token = logits[:, -1].argmax(-1)
                if eos is not None:
                    next_token = next_token.masked_fill(finished, eos)
                    finished |= next_token == eos
                ids = torch.cat([ids, next_token.unsqueeze(-1)], dim=1)
                if eos is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return ids
