"""A look at one attention layer on a real sentence: weights per head, kernel, torch parity.

The token embeddings are fixed random vectors plus sinusoidal positions, so the weights show
what the layer does with fresh parameters; the point is the mechanics, printed step by step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import explain
from .multi_head_attention import MultiHeadAttention

SENTENCE = "the cat sat on the mat because it was warm"


def _embed(tokens: list[str], embed_dim: int, generator: torch.Generator) -> Tensor:
    """Same word → same vector (a seeded table), plus the paper's sinusoidal positions."""
    vocab = sorted(set(tokens))
    table = torch.randn(len(vocab), embed_dim, generator=generator)
    ids = torch.tensor([vocab.index(t) for t in tokens])
    position = torch.arange(len(tokens)).unsqueeze(1)
    div = torch.exp(torch.arange(0, embed_dim, 2) * (-math.log(10000.0) / embed_dim))
    pe = torch.zeros(len(tokens), embed_dim)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)[:, : embed_dim // 2]
    return (table[ids] + pe).unsqueeze(0)  # (1, seq, embed)


def _format_heads(weights: Tensor, tokens: list[str]) -> str:
    """For each head: every query token, the key it attends to most, and that weight."""
    lines = []
    width = max(len(t) for t in tokens)
    for head in range(weights.shape[0]):
        lines.append(f"head {head}:")
        for i, token in enumerate(tokens):
            row = weights[head, i]
            top = int(row.argmax())
            bar = " ".join(f"{w:4.2f}" for w in row[: i + 1].tolist())
            lines.append(f"  {token:>{width}} → {tokens[top]:<{width}} ({row[top]:.2f})  [{bar}]")
    return "\n".join(lines)


def run(embed_dim: int = 32, num_heads: int = 4, seed: int = 0) -> float:
    """Print the demo; return the largest difference from torch.nn.MultiheadAttention."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokens = SENTENCE.split()
    layer = MultiHeadAttention(embed_dim, num_heads).eval()  # validates the sizes first
    x = _embed(tokens, embed_dim, generator)

    print(
        f'Sentence: "{SENTENCE}" ({len(tokens)} tokens), embed_dim={embed_dim}, '
        f"num_heads={num_heads}, head_dim={layer.head_dim}, causal self-attention\n"
    )
    with torch.no_grad():
        output, weights = layer(x, causal=True, need_weights="per_head")
    print("Attention weights per head (each row: query → most-attended key, then the row):")
    print(_format_heads(weights[0], tokens))
    rows = weights[0].sum(-1)
    print(f"\nEvery row sums to 1: max |sum - 1| = {(rows - 1).abs().max():.1e}")

    q = x.view(1, len(tokens), num_heads, layer.head_dim).transpose(1, 2)
    print("\nKernel without weights: " + explain(q, q, q, causal=True))
    print("Kernel with weights:    " + explain(q, q, q, causal=True, return_weights=True))

    reference = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(layer.in_proj.weight)
        reference.in_proj_bias.copy_(layer.in_proj.bias)
        reference.out_proj.load_state_dict(layer.out_proj.state_dict())
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).triu(1)  # True = blocked
        expected, expected_weights = reference(
            x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False
        )
    diff = max(
        float((output - expected).abs().max()),
        float((weights - expected_weights).abs().max()),
    )
    print(
        "\ntorch.nn.MultiheadAttention with the same weights: "
        f"max |difference| = {diff:.1e} (outputs and per-head weights)"
    )
    return diff
