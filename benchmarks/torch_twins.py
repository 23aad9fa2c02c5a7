"""The library's models with their attention stacks built from `torch.nn` instead.

The contenders of the benchmarks: each twin has the same architecture as our model and starts
from the same weights (ours are copied into torch's modules, every parameter matched exactly
once), so that a difference in speed or in what training reaches comes from the attention
library and nothing else.

- `TorchSeq2Seq`: `Seq2SeqTransformer` around `torch.nn.Transformer`. It decodes with our
  greedy and beam search code, recomputing the prefix at every step: `nn.Transformer` has no
  key/value cache.
- `TorchEncoder`: our `Encoder` stack as `torch.nn.TransformerEncoder`; `torch_vit` and
  `torch_speech_encoder` put it into a `ViT` and a `SpeechEncoder` (patch embedding, positions,
  heads and the CTC front end stay ours: they hold no attention).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multihead.masks import Mask
from multihead.models import Seq2SeqConfig, Seq2SeqTransformer
from multihead.models.speech import SpeechEncoder, SpeechEncoderConfig
from multihead.models.vit import ViT, ViTConfig
from multihead.positional import sinusoid_table
from multihead.transformer import Encoder

__all__ = [
    "TorchEncoder",
    "TorchSeq2Seq",
    "copy_seq2seq_weights",
    "copy_weights",
    "torch_name",
    "torch_seq2seq",
    "torch_speech_encoder",
    "torch_vit",
]


def torch_name(name: str) -> str:
    """Our parameter name → torch's, inside a layer stack (``layers.0.cross_attn.in_proj.weight``
    → ``layers.0.multihead_attn.in_proj_weight``, ``layers.0.feed_forward.linear1.bias`` →
    ``layers.0.linear1.bias``)."""
    name = name.replace(".cross_attn.", ".multihead_attn.").replace(".feed_forward.", ".")
    return name.replace(".in_proj.weight", ".in_proj_weight").replace(
        ".in_proj.bias", ".in_proj_bias"
    )


@torch.no_grad()
def copy_weights(ours: nn.Module, theirs: nn.Module, rename=torch_name) -> None:
    """Load our weights into the twin; every parameter on both sides is matched exactly once."""
    target = dict(theirs.named_parameters())
    mapped = {rename(name): p for name, p in ours.named_parameters()}
    if set(mapped) != set(target):
        raise ValueError(
            f"parameter names do not match: ours only {sorted(set(mapped) - set(target))[:4]}, "
            f"torch only {sorted(set(target) - set(mapped))[:4]}"
        )
    for name, parameter in mapped.items():
        target[name].copy_(parameter)


# -- translation -------------------------------------------------------------------------------


class TorchSeq2Seq(nn.Module):
    """`Seq2SeqTransformer`'s architecture around `torch.nn.Transformer` (pre-norm).

    Shared embedding tied to the output, embedding·sqrt(d_model) + sinusoidal positions,
    dropout, then torch's encoder/decoder stacks (each with its final LayerNorm).
    Masks in torch's polarity: True = masked out.
    """

    pe: Tensor
    config_class = Seq2SeqConfig

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        if not (config.share_embeddings and config.norm_first and config.positions == "sinusoidal"):
            raise ValueError("the twin covers share_embeddings, norm_first, sinusoidal positions")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.register_buffer("pe", sinusoid_table(c.max_len, c.d_model), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        with warnings.catch_warnings():  # norm_first disables the nested-tensor path: fine
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                d_model=c.d_model,
                nhead=c.num_heads,
                num_encoder_layers=c.num_encoder_layers,
                num_decoder_layers=c.num_decoder_layers,
                dim_feedforward=c.dim_feedforward,
                dropout=c.dropout,
                batch_first=True,
                norm_first=True,
            )

    def embed(self, ids: Tensor) -> Tensor:
        x = self.embedding(ids) * math.sqrt(self.config.d_model)
        return self.dropout(x + self.pe[: ids.shape[1]])

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S) ids → memory (B, S, d) and the source padding mask (True = pad)."""
        src_pad = src == self.config.pad_id
        return self.transformer.encoder(self.embed(src), src_key_padding_mask=src_pad), src_pad

    def decode_hidden(
        self, tgt: Tensor, memory: Tensor, src_pad: Tensor, tgt_pad: Tensor | None = None
    ) -> Tensor:
        length = tgt.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=tgt.device).triu(1)
        return self.transformer.decoder(
            self.embed(tgt),
            memory,
            tgt_mask=future,
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad,
        )

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing, as `Seq2SeqTransformer.forward`: logits (B, T, vocab)."""
        memory, src_pad = self.encode(src)
        hidden = self.decode_hidden(tgt_in, memory, src_pad, tgt_in == self.config.pad_id)
        return F.linear(hidden, self.embedding.weight)

    # Decoding: our greedy and beam search, fed by a step that recomputes the whole prefix.
    def new_caches(self, batch_size: int, max_len: int, like: Tensor) -> None:
        """No key/value cache: `nn.Transformer` has none."""
        return None

    def _next_log_probs(
        self, tokens: Tensor, memory: Tensor, src_pad: Tensor, caches: None
    ) -> Tensor:
        hidden = self.decode_hidden(tokens, memory, src_pad)
        return F.log_softmax(F.linear(hidden[:, -1], self.embedding.weight).float(), dim=-1)

    generate = Seq2SeqTransformer.generate
    _greedy = Seq2SeqTransformer._greedy
    _beam_search = Seq2SeqTransformer._beam_search
    _check_ids = Seq2SeqTransformer._check_ids
    _never_generate = Seq2SeqTransformer._never_generate
    _strip = Seq2SeqTransformer._strip
    save_pretrained = Seq2SeqTransformer.save_pretrained


def copy_seq2seq_weights(ours: Seq2SeqTransformer, twin: TorchSeq2Seq) -> None:
    """Our translation model's weights into its twin (the stacks live under ``transformer``)."""

    def rename(name: str) -> str:
        return name if name == "embedding.weight" else "transformer." + torch_name(name)

    copy_weights(ours, twin, rename)


def torch_seq2seq(config: Seq2SeqConfig) -> TorchSeq2Seq:
    """The twin with the weights `Seq2SeqTransformer(config)` would start from (same RNG)."""
    ours = Seq2SeqTransformer(config)  # first, so that it draws what our recipe's model draws
    twin = TorchSeq2Seq(config)
    copy_seq2seq_weights(ours, twin)
    return twin


# -- encoder stacks: image and speech ----------------------------------------------------------


class TorchEncoder(nn.Module):
    """Our pre-norm `Encoder` as `torch.nn.TransformerEncoder` (final LayerNorm included),
    started from the given stack's weights; takes our ``mask=`` (a padding `Mask` or None)."""

    def __init__(self, ours: Encoder, num_heads: int, dim_feedforward: int, dropout: float,
                 activation: str) -> None:  # fmt: skip
        super().__init__()
        if ours.norm is None:
            raise ValueError("the twin covers pre-norm stacks (with their final norm)")
        d_model = ours.norm.weight.shape[0]
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            dim_feedforward,
            dropout,
            activation,
            batch_first=True,
            norm_first=True,
        )
        with warnings.catch_warnings():  # norm_first disables the nested-tensor path: fine
            warnings.simplefilter("ignore", UserWarning)
            self.stack = nn.TransformerEncoder(
                layer, len(ours.layers), norm=nn.LayerNorm(d_model), enable_nested_tensor=False
            )
        copy_weights(ours, self.stack)

    def forward(self, x: Tensor, *, mask: Mask | None = None) -> Tensor:
        # A key that no query may see is padding (torch's polarity: True = masked out).
        pad = None if mask is None else ~mask.to_dense(x.device)[:, 0].any(dim=-2)
        return self.stack(x, src_key_padding_mask=pad)


def _with_torch_encoder(model: ViT | SpeechEncoder) -> ViT | SpeechEncoder:
    """``model`` with its encoder stack replaced by torch's, carrying the same weights."""
    c = model.config
    model.encoder = TorchEncoder(  # type: ignore[assignment]
        model.encoder, c.num_heads, c.dim_feedforward, c.dropout, c.activation
    )
    return model


def torch_vit(config: ViTConfig) -> ViT:
    """`ViT(config)` (same initial weights) whose encoder is `torch.nn.TransformerEncoder`."""
    return _with_torch_encoder(ViT(config))  # type: ignore[return-value]


def torch_speech_encoder(config: SpeechEncoderConfig) -> SpeechEncoder:
    """`SpeechEncoder(config)` (same initial weights) whose encoder is torch's.

    torch's encoder layer has no relative positions (RoPE, T5 buckets, ALiBi) and no
    convolution module, so the twin is of the sinusoidal, attention-only encoder.
    """
    if config.attention is not None or not config.absolute_positions or config.conv_kernel:
        raise ValueError(
            "torch.nn.TransformerEncoder has no relative positions or convolution modules: "
            "the twin needs --positions sinusoidal --conv-kernel 0"
        )
    return _with_torch_encoder(SpeechEncoder(config))  # type: ignore[return-value]
