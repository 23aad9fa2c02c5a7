"""A decoder-only Transformer language model (GPT, Llama, Mistral): causal self-attention only.

ids → embedding (+ positions) → `DecoderOnly` blocks → final norm → logits (the head tied to
the embedding by default). The GPT-2 recipe is the default (LayerNorm, GELU, learned
positions, biases); `LMConfig.modern` is the Llama recipe (RMSNorm, SwiGLU, RoPE, no biases,
untied head), to which ``num_kv_heads`` (GQA) and ``window`` (Mistral's sliding window) add.

Training on packed rows (several documents per row) passes ``doc_ids``: each token sees
only its own document, and absolute positions restart at 0 in each, so a document gets the
loss it would get alone. Generation (`multihead.decoding`) is greedy or sampled, one token
per step over the layers' KV caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import decoding
from ..attention_config import AttentionConfig, SelfCache
from ..masks import Mask, documents
from ..positional import LearnedPositions, SinusoidalPositions
from ..transformer import ACTIVATIONS, DecoderOnly
from .base import PretrainedMixin, check_token_ids

__all__ = ["LMConfig", "TransformerLM", "document_positions"]

POSITIONS = ("sinusoidal", "learned", "rope", "alibi")


@dataclass
class LMConfig:
    """Sizes and recipe of a decoder-only LM; ``eos_id`` (optional) stops generation early.

    ``positions``: added to the embeddings ("sinusoidal", "learned") or inside attention
    ("rope" with ``rope_base`` as θ, "alibi"). ``bias`` covers every linear layer and
    LayerNorm; ``attention_bias`` (None: as ``bias``) the attention projections alone.
    ``window``: each token sees only the last ``window`` tokens (itself included).
    """

    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    max_len: int = 256
    norm_first: bool = True
    tie_embeddings: bool = True
    positions: Literal["sinusoidal", "learned", "rope", "alibi"] = "learned"
    activation: Literal["relu", "gelu", "swiglu", "geglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    num_kv_heads: int | None = None
    eos_id: int | None = None
    norm_eps: float = 1e-5
    bias: bool = True
    attention_bias: bool | None = None
    rope_base: float = 10000.0
    window: int | None = None
    qk_norm: bool = False
    softcap: float | None = None

    @classmethod
    def modern(cls, vocab_size: int, **overrides: Any) -> LMConfig:
        """The Llama recipe: RMSNorm, SwiGLU, RoPE, no biases, an untied head, no dropout."""
        recipe: dict[str, Any] = {
            "norm": "rmsnorm",
            "activation": "swiglu",
            "positions": "rope",
            "bias": False,
            "tie_embeddings": False,
            "dropout": 0.0,
            "norm_eps": 1e-6,
        }
        return cls(vocab_size=vocab_size, **{**recipe, **overrides})

    def attention_config(self) -> AttentionConfig:
        """The options every block's attention gets."""
        inside = self.positions if self.positions in ("rope", "alibi") else None
        return AttentionConfig(
            num_kv_heads=self.num_kv_heads,
            bias=self.attention_bias,
            qk_norm=self.qk_norm,
            softcap=self.softcap,
            positions=inside,  # type: ignore[arg-type]
            rope_base=self.rope_base,
            window=self.window,
        )

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
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise TypeError(f"dropout must be a number, got {type(self.dropout).__name__}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
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
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.positions == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"positions='rope' needs an even head size, got d_model/num_heads = "
                f"{self.d_model // self.num_heads}"
            )
        self.attention_config()  # validates window, softcap, bias and qk_norm


def document_positions(doc_ids: Tensor) -> Tensor:
    """Each token's position inside its document, a run of equal ids: 0, 1, ... restarting
    wherever the id changes. ``doc_ids`` (..., seq) → same shape, int64."""
    index = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand(doc_ids.shape)
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return index - torch.where(starts, index, 0).cummax(dim=-1).values


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
        self.positions: SinusoidalPositions | LearnedPositions | None = None
        if c.positions == "sinusoidal":
            self.positions = SinusoidalPositions(c.d_model, c.max_len)
        elif c.positions == "learned":
            self.positions = LearnedPositions(c.d_model, c.max_len)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = DecoderOnly(
            c.num_layers, c.d_model, c.num_heads, c.dim_feedforward, c.dropout,
            activation=c.activation, norm=c.norm, norm_first=c.norm_first,
            layer_norm_eps=c.norm_eps, bias=c.bias, attention=c.attention_config(),
        )  # fmt: skip
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)

    def _check_doc_ids(self, doc_ids: object, ids: Tensor) -> Tensor:
        if not isinstance(doc_ids, Tensor):
            raise TypeError(f"doc_ids must be a torch.Tensor, got {type(doc_ids).__name__}")
        if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex:
            raise TypeError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
        if doc_ids.dtype == torch.bool:
            raise TypeError("doc_ids must be an integer tensor, got torch.bool")
        if doc_ids.shape not in (ids.shape, ids.shape[1:]):
            raise ValueError(
                f"doc_ids must be (batch, seq) = {tuple(ids.shape)} or (seq,) like ids, "
                f"got shape {tuple(doc_ids.shape)}"
            )
        if doc_ids.device != ids.device:
            raise ValueError(f"doc_ids is on {doc_ids.device} but ids is on {ids.device}")
        return doc_ids

    def forward(
        self,
        ids: Tensor,
        *,
        mask: Mask | Tensor | None = None,
        doc_ids: Tensor | None = None,
        offset: int = 0,
        caches: list[SelfCache] | None = None,
    ) -> Tensor:
        """ids (B, T) at positions offset.. → logits (B, T, vocab). Always causal.

        ``mask`` (a `Mask` or boolean/float tensor, True = may attend) joins the causal
        mask. ``doc_ids`` (B, T) or (T,): packed documents, as runs of equal ids; each token
        sees only its document, whose absolute positions restart at 0 (RoPE and ALiBi are
        relative already). With ``caches`` (decoding) only ``mask`` applies.
        """
        if not torch.compiler.is_compiling():  # the range check reads the ids: a host sync
            check_token_ids("ids", ids, self.config.vocab_size, self.embedding.weight)
        positions = None
        if doc_ids is not None:
            if mask is not None or caches is not None:
                raise ValueError(
                    "doc_ids builds the documents mask for training on packed rows: "
                    "pass mask or caches without it"
                )
            doc_ids = self._check_doc_ids(doc_ids, ids)
            mask = documents(doc_ids)
            positions = document_positions(doc_ids)
        x = self.embedding(ids)
        if self.positions is not None:
            x = self.positions(x, offset, positions)
        h = self.blocks(self.dropout(x), mask=mask, caches=caches)
        return F.linear(h, self.embedding.weight) if self.head is None else self.head(h)

    def new_caches(self, batch_size: int, max_len: int, like: Tensor) -> list[SelfCache]:
        """One empty cache per block (a ring buffer of ``window`` positions if windowed)."""
        return self.blocks.new_caches(batch_size, max_len, dtype=like.dtype, device=like.device)

    def _step(self, ids: Tensor, offset: int, caches: list[SelfCache] | None) -> Tensor:
        return self(ids, offset=offset, caches=caches)

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        *,
        max_new_tokens: int = 32,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue the prompts ``ids`` (B, P) → (B, P + new tokens).

        Greedy when ``temperature`` is 0 (the default); else each token is drawn from
        softmax(logits / temperature), restricted to the ``top_k`` likeliest and to the
        nucleus of mass ``top_p``, reproducibly with a seeded ``generator``. Stops early
        once every row has produced ``eos_id`` (rows that ended are filled with eos). The
        prompt plus the new tokens must fit in max_len. ``use_cache=False`` recomputes the
        prefix each step (for tests and benchmarks).
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
        if ids.shape[1] + max_new_tokens - 1 > self.config.max_len:  # the last is not fed back
            raise ValueError(
                f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_len={self.config.max_len}"
            )
        was_training = self.training
        self.eval()
        try:
            return decoding.generate(
                self._step,
                ids,
                max_new_tokens=max_new_tokens,
                stack=self.blocks if use_cache else None,
                eos_id=self.config.eos_id,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
        finally:
            self.train(was_training)
