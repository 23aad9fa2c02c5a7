"""Stack-level varlen: layers and stacks over a packed ragged batch (``cu_seqlens=``).

The oracle is each sequence run alone, as a batch of one, through the same module: packed
outputs and gradients (input and every parameter) must equal those runs in float64.
"""

from __future__ import annotations

import pytest
import torch

from multihead import masks
from multihead.transformer import (
    AttentionConfig,
    DecoderOnly,
    DecoderOnlyLayer,
    Encoder,
    EncoderLayer,
)

D_MODEL, HEADS = 16, 4
LENGTHS = [5, 1, 9, 0, 3]
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _build(kind: str, attention: AttentionConfig, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = (D_MODEL, HEADS, 32, 0.0)
    if kind in ("Encoder", "DecoderOnly"):
        cls = Encoder if kind == "Encoder" else DecoderOnly
        module = cls(2, *sizes, attention=attention, **kwargs)
    else:
        cls = EncoderLayer if kind == "EncoderLayer" else DecoderOnlyLayer
        module = cls(*sizes, attention=attention, **kwargs)
    # LayerNorm starts at weight 1, bias 0: make the norms count in the gradient check.
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return module.double()


def _grads(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad, *(p.grad for p in module.parameters())]


def _packed_vs_alone(module, lengths, call_kwargs):
    cu = _cu(lengths)
    x = torch.randn(int(cu[-1]), D_MODEL, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(int(cu[-1]), D_MODEL, dtype=torch.float64)

    module.zero_grad()
    packed = module(x, cu_seqlens=cu, **call_kwargs)
    (packed * weight).sum().backward()
    packed_grads = [g.clone() for g in _grads(module, x)]

    module.zero_grad()
    x.grad = None
    alone = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if end == start:
            alone.append(x[start:end])  # no token: nothing to run
            continue
        out = module(x[start:end].unsqueeze(0), **call_kwargs)[0]
        (out * weight[start:end]).sum().backward()
        alone.append(out)
    alone_grads = _grads(module, x)
    return packed, torch.cat(alone), packed_grads, alone_grads


@pytest.mark.parametrize("kind", ["EncoderLayer", "DecoderOnlyLayer", "Encoder", "DecoderOnly"])
@pytest.mark.parametrize("causal", [None, False, True])
@pytest.mark.parametrize(
    "attention",
    [
        AttentionConfig(),
        AttentionConfig(num_kv_heads=2, positions="rope"),
        AttentionConfig(num_kv_heads=1, positions="rope", qk_norm=True, softcap=5.0),
    ],
    ids=["plain", "gqa-rope", "mqa-rope-qknorm-softcap"],
)
def test_packed_equals_each_sequence_alone(kind, causal, attention) -> None:
    module = _build(kind, attention)
    call_kwargs = {} if causal is None else {"causal": causal}
    packed, alone, packed_grads, alone_grads = _packed_vs_alone(module, LENGTHS, call_kwargs)
    assert packed.shape == (sum(LENGTHS), D_MODEL)
    torch.testing.assert_close(packed, alone, **TIGHT)
    for got, want in zip(packed_grads, alone_grads, strict=True):
        torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("norm_first", [True, False])
def test_packed_post_norm_rmsnorm_swiglu_no_bias(norm_first) -> None:
    module = _build(
        "DecoderOnly",
        AttentionConfig(num_kv_heads=2, positions="rope"),
        activation="swiglu",
        norm="rmsnorm",
        norm_first=norm_first,
        bias=False,
    )
    packed, alone, packed_grads, alone_grads = _packed_vs_alone(module, [4, 7, 2], {})
    torch.testing.assert_close(packed, alone, **TIGHT)
    for got, want in zip(packed_grads, alone_grads, strict=True):
        torch.testing.assert_close(got, want, **TIGHT)


def test_packed_is_not_the_unmasked_concatenation() -> None:
    """The test above can fail: attending across sequences gives another answer."""
    module = _build("Encoder", AttentionConfig(positions="rope"))
    cu = _cu([4, 6])
    x = torch.randn(10, D_MODEL, dtype=torch.float64)
    packed = module(x, cu_seqlens=cu)
    together = module(x.unsqueeze(0))[0]
    assert not torch.allclose(packed, together, atol=1e-3)
    one = module(x, cu_seqlens=_cu([10]))
    torch.testing.assert_close(one, together, **TIGHT)


def test_window_that_holds_every_sequence_changes_nothing() -> None:
    lengths = [3, 6, 2]
    windowed = _build("DecoderOnly", AttentionConfig(num_kv_heads=2, window=6))
    plain = _build("DecoderOnly", AttentionConfig(num_kv_heads=2))
    plain.load_state_dict(windowed.state_dict())
    x = torch.randn(sum(lengths), D_MODEL, dtype=torch.float64)
    cu = _cu(lengths)
    torch.testing.assert_close(windowed(x, cu_seqlens=cu), plain(x, cu_seqlens=cu), **TIGHT)
    layer = _build("DecoderOnlyLayer", AttentionConfig(window=6))
    want = torch.cat([layer(x[a:b].unsqueeze(0))[0] for a, b in ((0, 3), (3, 9), (9, 11))])
    torch.testing.assert_close(layer(x, cu_seqlens=cu), want, **TIGHT)


@pytest.mark.parametrize("kind", ["DecoderOnlyLayer", "DecoderOnly"])
def test_window_shorter_than_a_sequence_is_refused(kind) -> None:
    module = _build(kind, AttentionConfig(window=4))
    x = torch.randn(9, D_MODEL, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sliding window \(4\).*longest packed sequence \(5"):
        module(x, cu_seqlens=_cu([4, 5]))
    with pytest.raises(ValueError, match="causal=True"):
        module(x, cu_seqlens=_cu([4, 5]), causal=False)


@pytest.mark.parametrize("kind", ["EncoderLayer", "Encoder"])
def test_what_cannot_combine_with_cu_seqlens_is_refused(kind) -> None:
    module = _build(kind, AttentionConfig())
    x = torch.randn(9, D_MODEL, dtype=torch.float64)
    cu = _cu([4, 5])
    with pytest.raises(ValueError, match="mask cannot be combined with cu_seqlens"):
        module(x, cu_seqlens=cu, mask=masks.causal(9, 9))
    cache_kw = {"cache": object()} if kind == "EncoderLayer" else {"caches": [object()] * 2}
    with pytest.raises(ValueError, match="cache cannot be combined with cu_seqlens"):
        module(x, cu_seqlens=cu, **cache_kw)
    with pytest.raises(ValueError, match=r"packed as \(total_tokens, d_model\), got \(1, 9, 16\)"):
        module(x.unsqueeze(0), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens ends at 8 but x packs 9 tokens"):
        module(x, cu_seqlens=_cu([4, 4]))
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        module(x, cu_seqlens=torch.tensor([0.0, 9.0]))


@pytest.mark.parametrize("positions", ["alibi", "relative"])
def test_position_biases_on_packed_input_equal_each_sequence_alone(positions) -> None:
    module = _build("Encoder", AttentionConfig(positions=positions))
    x = torch.randn(9, D_MODEL, dtype=torch.float64)
    packed = module(x, cu_seqlens=_cu([4, 5]))
    alone = torch.cat([module(part.unsqueeze(0))[0] for part in x.split([4, 5])])
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-10)


def test_packed_float32_matches_alone_and_trains() -> None:
    module = _build("DecoderOnly", AttentionConfig(num_kv_heads=2, positions="rope")).float()
    cu = _cu([6, 3, 8])
    x = torch.randn(17, D_MODEL, requires_grad=True)
    out = module(x, cu_seqlens=cu)
    want = torch.cat([module(x[a:b].unsqueeze(0))[0] for a, b in ((0, 6), (6, 9), (9, 17))])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
