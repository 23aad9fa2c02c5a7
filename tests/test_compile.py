"""The default forward compiles as one graph and exports: no host read, no branch on tensor
values. Each case runs under `torch.compile(fullgraph=True)` (which raises at the first
graph break) and `torch.export.export`, and must equal eager."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import multihead
from multihead import masks


def _layer(**options) -> multihead.MultiHeadAttention:
    torch.manual_seed(0)
    return multihead.MultiHeadAttention(32, 4, **options).eval()


class Call(nn.Module):
    """A module calling ``layer`` with fixed keyword arguments (export takes modules)."""

    def __init__(self, layer: nn.Module, **kwargs: object) -> None:
        super().__init__()
        self.layer, self.kwargs = layer, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x, **self.kwargs)
        return out[1] if isinstance(out, tuple) else out


PADDING = masks.padding([10, 7], 10)  # built once, outside the compiled region

CASES = {
    "causal_gqa_rope": lambda: Call(_layer(num_kv_heads=2, positions="rope"), causal=True),
    "padding_mask": lambda: Call(_layer(), mask=PADDING),
    "bool_tensor_mask": lambda: Call(_layer(), mask=PADDING.to_dense()),
    "alibi_causal": lambda: Call(_layer(positions="alibi"), causal=True),
    "relative_padding": lambda: Call(_layer(positions="relative"), mask=PADDING),
    "weights_with_a_mask": lambda: Call(_layer(), mask=PADDING, need_weights="per_head"),
    "softcap_qk_norm": lambda: Call(_layer(softcap=5.0, qk_norm=True), causal=True),
    "encoder_layer": lambda: Call(multihead.EncoderLayer(32, 4, 64, dropout=0.0).eval()),
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_compiles_as_one_graph_and_equals_eager(case, device):
    module = CASES[case]().to(device)
    if "mask" in getattr(module, "kwargs", {}) and isinstance(module.kwargs["mask"], torch.Tensor):
        module.kwargs = {**module.kwargs, "mask": module.kwargs["mask"].to(device)}
    x = torch.randn(2, 10, 32, device=device)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["causal_gqa_rope", "padding_mask", "alibi_causal"])
def test_exports_and_the_program_equals_eager(case):
    module = CASES[case]()
    x = torch.randn(2, 10, 32)
    program = torch.export.export(module, (x,))
    other = torch.randn(2, 10, 32)
    torch.testing.assert_close(program.module()(other), module(other), atol=1e-6, rtol=1e-6)


def test_a_language_model_compiles_as_one_graph():
    torch.manual_seed(0)
    config = multihead.LMConfig.modern(30, d_model=32, num_heads=4, num_layers=2, max_len=16)
    model = multihead.TransformerLM(config).eval()
    ids = torch.randint(0, 30, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap of SDPA
def test_the_layer_works_under_vmap_and_functional_call():
    layer = _layer()
    xs = torch.randn(3, 2, 10, 32)
    batched = torch.func.vmap(lambda x: layer(x, causal=True))(xs)
    torch.testing.assert_close(batched, torch.stack([layer(x, causal=True) for x in xs]))
    params = {name: p.detach() * 2 for name, p in layer.named_parameters()}
    doubled = torch.func.functional_call(layer, params, (xs[0],), {"causal": True})
    twin = _layer()
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    torch.testing.assert_close(doubled, twin(xs[0], causal=True))


def _one_graph(fn, *args):
    """``fn`` compiled with fullgraph=True (raises at a graph break), run on ``args``."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager")(*args)


@pytest.mark.parametrize("cache_kind", ["kv", "sliding_window"])
def test_a_decoding_step_with_a_cache_compiles_as_one_graph(cache_kind):
    """Prefill eagerly, then one decoding step compiled; the same steps eagerly on a second
    cache give the same output and leave the same keys and values behind."""
    from multihead.cache import KVCache, SlidingWindowKVCache

    layer = _layer(num_kv_heads=2, positions="rope")
    x = torch.randn(2, 6, 32)
    caches = [
        KVCache(2, 2, 16, 8) if cache_kind == "kv" else SlidingWindowKVCache(2, 2, 4, 8)
        for _ in range(2)
    ]
    with torch.no_grad():
        for cache in caches:
            layer(x[:, :5], cache=cache, causal=True)
        eager = layer(x[:, 5:], cache=caches[0], causal=True)
        compiled = _one_graph(lambda y: layer(y, cache=caches[1], causal=True), x[:, 5:])
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    assert caches[1].offset == caches[0].offset == 6
    torch.testing.assert_close(caches[1].keys, caches[0].keys)


def test_models_that_build_their_masks_inside_compile_as_one_graph():
    """Masks built inside the compiled region from tensors (padding from lengths, packed
    documents from ids) skip their host-side range checks there and trace."""
    from multihead.models.speech import SpeechEncoder, SpeechEncoderConfig

    torch.manual_seed(0)
    config = multihead.LMConfig.modern(30, d_model=32, num_heads=4, num_layers=2, max_len=16)
    lm = multihead.TransformerLM(config).eval()
    ids = torch.randint(0, 30, (2, 12))
    doc_ids = torch.tensor([0] * 5 + [1] * 7)
    lengths = torch.tensor([12, 7])
    speech = SpeechEncoder(SpeechEncoderConfig(d_model=32, num_layers=1, conv_channels=8)).eval()
    feats, frames = torch.randn(2, 40, 40), torch.tensor([40, 23])
    seq2seq_config = multihead.Seq2SeqConfig(
        vocab_size=30, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=64, dropout=0.0,
    )  # fmt: skip
    seq2seq = multihead.Seq2SeqTransformer(seq2seq_config).eval()
    src = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])  # 0 pads
    tgt = torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]])
    calls = {
        "lm_documents": (lambda i, d: lm(i, doc_ids=d), ids, doc_ids),
        "lm_padding": (lambda i, n: lm(i, mask=masks.padding(n, 12)), ids, lengths),
        "speech": (lambda f, n: speech(f, n)[0], feats, frames),
        "seq2seq": (seq2seq, src, tgt),
    }
    with torch.no_grad():
        for name, (fn, *args) in calls.items():
            torch.testing.assert_close(_one_graph(fn, *args), fn(*args), msg=name)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("how", ["causal", "bool_mask"])
@pytest.mark.parametrize("where", ["query", "key"])
def test_inductor_keeps_the_nan_rows_of_eager(where, how, grad):
    """Compiled by inductor (which folds x·0 to 0: a NaN check written so lost its rows), a
    NaN or inf query row, or a NaN key, makes NaN the same rows as eager, and the other rows
    and their gradients equal eager's."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=gen) for _ in range(3))
    if where == "query":
        q[1, 2, 5, 3], q[0, 1, 30, 0] = math.nan, math.inf
    else:
        k[1, 0, 20, 7] = math.nan
    kwargs = {"causal": True} if how == "causal" else {"mask": torch.rand(1, 1, 37, 37) < 0.6}

    def attend(q, k, v):
        return multihead.attention(q, k, v, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=False)
    outputs, grads = [], []
    for fn in (attend, compiled):
        inputs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            out = fn(*inputs)
        outputs.append(out)
        if grad:
            finite = out.isfinite().all(-1, keepdim=True)
            loss = out.masked_fill(~finite, 0.0).square().sum()
            grads.append(torch.autograd.grad(loss, inputs))
    eager, got = outputs
    assert eager.isnan().any()
    assert torch.equal(got.isnan(), eager.isnan())
    torch.testing.assert_close(got.nan_to_num(), eager.nan_to_num(), atol=1e-5, rtol=1e-5)
    if grad:
        for g_compiled, g_eager in zip(*grads, strict=True):
            torch.testing.assert_close(g_compiled, g_eager, atol=1e-4, rtol=1e-4, equal_nan=True)
