"""The modules on the device: the layer against its float64 CPU twin, the drop-in against
torch's `nn.MultiheadAttention`, cached decoding against the full forward, a few training steps
of the models, and no host synchronisation in the layer's forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE_IDS, DTYPES, ON_CUDA, assert_close
from torch import Tensor, nn

import multihead as mh
from multihead import masks
from multihead.compat import MultiheadAttention

E, H = 64, 4  # embed_dim, heads


def twin64(module: nn.Module) -> nn.Module:
    """A float64 CPU copy with the same weights: the oracle of a module."""
    return copy.deepcopy(module).to("cpu", torch.float64)


def randn(*shape: int, seed: int, dtype=torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (biases too, which start at 0), from a CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return module


# -- MultiHeadAttention ------------------------------------------------------------------------
LAYER_MASKS = ["none", "causal", "padding", "sliding_window"]


def layer_mask_kwargs(kind: str, batch: int, seq: int, device: torch.device) -> dict:
    if kind == "causal":
        return {"causal": True}
    if kind == "padding":
        return {"mask": masks.padding(torch.tensor([seq, seq // 3], device=device), seq)}
    if kind == "sliding_window":
        return {"mask": masks.sliding_window(seq, window=17)}
    return {}


@pytest.mark.parametrize("mask_kind", LAYER_MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", [{}, {"num_kv_heads": 2, "positions": "rope"}],
                         ids=["mha", "gqa_rope"])  # fmt: skip
def test_layer_matches_its_float64_twin(layout, dtype, mask_kind, device):
    """Forward, input gradient and every parameter gradient of the layer on the device."""
    layer = randomise(mh.MultiHeadAttention(E, H, **layout), seed=1)
    twin = twin64(layer)
    layer = layer.to(device, dtype)
    x = randn(2, 90, E, seed=2, dtype=dtype)
    kwargs = layer_mask_kwargs(mask_kind, 2, 90, device)
    xd = x.to(device, copy=True).requires_grad_(True)
    out = layer(xd, **kwargs)
    x64 = x.double().requires_grad_(True)
    kwargs64 = layer_mask_kwargs(mask_kind, 2, 90, torch.device("cpu"))
    expected = twin(x64, **kwargs64)
    assert_close(out, expected, dtype, what="layer output")
    cotangent = randn(*out.shape, seed=3, dtype=dtype)
    out.backward(cotangent.to(device))
    expected.backward(cotangent.double())
    assert_close(xd.grad, x64.grad, dtype, grad=True, what="layer d input")
    for (name, p), (_, p64) in zip(layer.named_parameters(), twin.named_parameters(), strict=True):
        assert_close(p.grad, p64.grad, dtype, grad=True, what=f"layer d {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", [{}, {"num_kv_heads": 2, "positions": "rope"}],
                         ids=["mha", "gqa_rope"])  # fmt: skip
def test_kv_cache_decoding_equals_the_full_forward(layout, dtype, device):
    """A prompt of 10 tokens, then 1, 1, 3 and 1-token steps through a KVCache, against one
    causal forward over the whole sequence (and both against the float64 twin)."""
    layer = randomise(mh.MultiHeadAttention(E, H, **layout), seed=4).eval()
    twin = twin64(layer)
    layer = layer.to(device, dtype)
    x = randn(2, 30, E, seed=5, dtype=dtype)
    with torch.no_grad():
        expected = twin(x.double(), causal=True)
        full = layer(x.to(device), causal=True)
        cache = mh.KVCache(2, layer.num_kv_heads, 30, layer.head_dim, dtype=dtype, device=device)
        steps, start = [10, 1, 1, 3] + [1] * 15, 0
        pieces = []
        for n in steps:
            pieces.append(layer(x[:, start : start + n].to(device), causal=True, cache=cache))
            start += n
        decoded = torch.cat(pieces, dim=1)
    assert start == 30 and cache.length == 30
    assert_close(full, expected, dtype, what="full forward")
    assert_close(decoded, expected, dtype, what="cached decoding")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_sliding_window_cache_decoding_equals_the_windowed_forward(dtype, device):
    layer = randomise(mh.MultiHeadAttention(E, H, num_kv_heads=2, positions="rope"), 6).eval()
    twin = twin64(layer)
    layer = layer.to(device, dtype)
    x = randn(2, 40, E, seed=7, dtype=dtype)
    window = 8
    with torch.no_grad():
        expected = twin(x.double(), mask=masks.sliding_window(40, window=window))
        cache = mh.SlidingWindowKVCache(2, 2, window, layer.head_dim, dtype=dtype, device=device)
        pieces = [layer(x[:, :5].to(device), causal=True, cache=cache)]
        pieces += [
            layer(x[:, t : t + 1].to(device), causal=True, cache=cache) for t in range(5, 40)
        ]
    assert_close(torch.cat(pieces, dim=1), expected, dtype, what="sliding-window decoding")


def test_lm_generate_with_and_without_cache_agree(device):
    torch.manual_seed(0)
    config = mh.LMConfig(vocab_size=97, d_model=64, num_heads=4, num_layers=2,
                         dim_feedforward=128, dropout=0.0, max_len=64, num_kv_heads=2)  # fmt: skip
    model = mh.TransformerLM(config).to(device).eval()
    prompt = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt.to(device), max_new_tokens=20)
    recomputed = model.generate(prompt.to(device), max_new_tokens=20, use_cache=False)
    assert torch.equal(cached.cpu(), recomputed.cpu())


# -- compat.MultiheadAttention against torch.nn.MultiheadAttention ------------------------------
def torch_masks(kind: str, batch: int, q_len: int, k_len: int):
    """(key_padding_mask, attn_mask, is_causal) in torch's polarity (True = blocked), CPU."""
    gen = torch.Generator().manual_seed(11)
    padding = torch.zeros(batch, k_len, dtype=torch.bool)
    padding[1, k_len // 2 :] = True  # key 0 stays visible: torch gives NaN for an empty row
    if kind == "none":
        return None, None, False
    if kind == "key_padding":
        return padding, None, False
    if kind == "attn_mask_bool":
        blocked = torch.rand(q_len, k_len, generator=gen) < 0.4
        blocked[:, 0] = False
        return padding, blocked, False
    if kind == "attn_mask_float_per_head":
        bias = torch.randn(batch * H, q_len, k_len, generator=gen)
        return None, bias, False
    if kind == "causal":
        blocked = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
        return None, blocked, True
    raise KeyError(kind)


COMPAT_MASKS = ["none", "key_padding", "attn_mask_bool", "attn_mask_float_per_head", "causal"]


@pytest.mark.parametrize("mask_kind", COMPAT_MASKS)
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_compat_matches_torch_multihead_attention(batch_first, need_weights, mask_kind, device):
    """Ours and torch's module with the same weights, both on the device (torch's own fast
    paths included), against torch's module in float64 on the CPU; then the gradients."""
    batch, q_len, k_len = 3, 37, 37 if mask_kind == "causal" else 53
    ours = randomise(MultiheadAttention(E, H, batch_first=batch_first), seed=8)
    theirs = nn.MultiheadAttention(E, H, batch_first=batch_first)
    theirs.load_state_dict(ours.state_dict())
    oracle = twin64(theirs)
    ours, theirs = ours.to(device), theirs.to(device)
    pad, attn, is_causal = torch_masks(mask_kind, batch, q_len, k_len)

    def shape(n: int) -> tuple[int, ...]:
        return (batch, n, E) if batch_first else (n, batch, E)

    query = randn(*shape(q_len), seed=9)
    key = query if mask_kind == "causal" else randn(*shape(k_len), seed=10)
    value = key if mask_kind == "causal" else randn(*shape(k_len), seed=12)
    kwargs = {"need_weights": need_weights, "is_causal": is_causal}
    attn64 = attn if attn is None or attn.dtype == torch.bool else attn.double()
    inputs64 = [t.double() for t in (query, key, value)]
    with torch.no_grad():
        expected, expected_w = oracle.eval()(
            *inputs64, key_padding_mask=pad, attn_mask=attn64, **kwargs
        )
        dev = {"key_padding_mask": None if pad is None else pad.to(device),
               "attn_mask": None if attn is None else attn.to(device)}  # fmt: skip
        inputs = [t.to(device) for t in (query, key, value)]
        got, got_w = ours.eval()(*inputs, **dev, **kwargs)
        torch_got, torch_w = theirs.eval()(*inputs, **dev, **kwargs)
    assert_close(torch_got, expected, torch.float32, what="torch's module on the device")
    assert_close(got, expected, torch.float32, what="compat output")
    if need_weights:
        assert_close(got_w, expected_w, torch.float32, what="compat weights")
    else:
        assert got_w is None and torch_w is None

    # Training mode (no dropout): the parameter gradients.
    ours.train()
    oracle.train()
    inputs = [t.to(device) for t in (query, key, value)]
    out, _ = ours(*inputs, **dev, **kwargs)
    cotangent = randn(*out.shape, seed=13)
    out.backward(cotangent.to(device))
    out64, _ = oracle(*inputs64, key_padding_mask=pad, attn_mask=attn64, **kwargs)
    out64.backward(cotangent.double())
    for (name, p), (_, p64) in zip(ours.named_parameters(), oracle.named_parameters(), strict=True):
        assert_close(p.grad, p64.grad, torch.float32, grad=True, what=f"compat d {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_compat_low_precision(dtype, device):
    ours = randomise(MultiheadAttention(E, H, batch_first=True), seed=14)
    oracle = twin64(ours)
    ours = ours.to(device, dtype).eval()
    x = randn(2, 41, E, seed=15, dtype=dtype)
    pad = torch.zeros(2, 41, dtype=torch.bool)
    pad[0, 30:] = True
    with torch.no_grad():
        got, weights = ours(*(x.to(device),) * 3, key_padding_mask=pad.to(device))
        expected, expected_w = oracle.eval()(*(x.double(),) * 3, key_padding_mask=pad)
    assert_close(got, expected, dtype, what="compat output")
    assert_close(weights, expected_w, dtype, what="compat weights")


def test_compat_fully_masked_row_is_zero_where_torch_gives_nan(device):
    ours = randomise(MultiheadAttention(E, H, batch_first=True), seed=16).to(device)
    x = randn(2, 9, E, seed=17).to(device).requires_grad_(True)
    pad = torch.zeros(2, 9, dtype=torch.bool, device=device)
    pad[1] = True  # every key of batch element 1 is padding
    out, weights = ours(x, x, x, key_padding_mask=pad)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    assert (weights[1] == 0).all()
    # The output of an empty row is W_o · 0 + b_o: the output projection's bias alone.
    assert torch.allclose(out[1], ours.out_proj.bias.expand(9, E), atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- training steps ------------------------------------------------------------------------------
def _pattern_batch(device: torch.device) -> Tensor:
    """Arithmetic sequences mod 61 with a step per row: the next token follows from the last
    two, so a small model learns it in a few dozen steps."""
    gen = torch.Generator().manual_seed(21)
    start = torch.randint(0, 61, (16, 1), generator=gen)
    step = torch.randint(1, 8, (16, 1), generator=gen)
    return ((start + step * torch.arange(48)) % 61).to(device)


def _train(model: nn.Module, loss_of, steps: int, device: torch.device, bf16: bool) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite grad in {name}"
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_lm_trains(bf16, device):
    torch.manual_seed(0)
    config = mh.LMConfig(vocab_size=61, d_model=128, num_heads=4, num_layers=2,
                         dim_feedforward=256, dropout=0.1, max_len=64, num_kv_heads=2)  # fmt: skip
    model = mh.TransformerLM(config).to(device).train()
    ids = _pattern_batch(device)

    def loss_of(m: nn.Module) -> Tensor:
        logits = m(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    losses = _train(model, loss_of, 40, device, bf16)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.5 * losses[0], (
        f"the loss did not fall: {losses[0]:.3f} → {losses[-1]:.3f}"
    )


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_seq2seq_trains_on_padded_batches(bf16, device):
    """The translation model on a reversal task with padded sources and targets (padding
    masks in the encoder, the decoder and the cross-attention)."""
    torch.manual_seed(0)
    config = mh.Seq2SeqConfig(vocab_size=40, d_model=128, num_heads=4, num_encoder_layers=2,
                              num_decoder_layers=2, dim_feedforward=256, dropout=0.1,
                              max_len=64)  # fmt: skip
    model = mh.Seq2SeqTransformer(config).to(device).train()
    gen = torch.Generator().manual_seed(22)
    lengths = torch.randint(5, 20, (24,), generator=gen)
    src = torch.randint(3, 40, (24, 20), generator=gen)
    src = src.masked_fill(torch.arange(20) >= lengths.unsqueeze(1), config.pad_id)
    tgt = torch.full((24, 22), config.pad_id)
    for b, n in enumerate(lengths.tolist()):
        tgt[b, 0] = config.bos_id
        tgt[b, 1 : n + 1] = src[b, :n].flip(0)
        tgt[b, n + 1] = config.eos_id
    src, tgt = src.to(device), tgt.to(device)

    def loss_of(m: nn.Module) -> Tensor:
        logits = m(src, tgt[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten(),
                               ignore_index=config.pad_id)  # fmt: skip

    losses = _train(model, loss_of, 40, device, bf16)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.75 * losses[0], (
        f"the loss did not fall: {losses[0]:.3f} → {losses[-1]:.3f}"
    )


def test_lm_logits_match_the_float64_twin(device):
    torch.manual_seed(0)
    config = mh.LMConfig(vocab_size=61, d_model=64, num_heads=4, num_layers=2,
                         dim_feedforward=128, dropout=0.0, max_len=64)  # fmt: skip
    model = mh.TransformerLM(config).eval()
    twin = twin64(model)
    ids = _pattern_batch(torch.device("cpu"))
    with torch.no_grad():
        got = model.to(device)(ids.to(device))
        expected = twin(ids)
    assert_close(got, expected, torch.float32, what="LM logits")


# -- no host synchronisation in the forward ------------------------------------------------------
def _sync_cases(device: torch.device):
    """name → (callable running one forward [and backward], known host sync or None)."""
    layer = mh.MultiHeadAttention(256, 8).to(device)
    gqa = mh.MultiHeadAttention(256, 8, num_kv_heads=2, positions="rope").to(device)
    x = torch.randn(2, 128, 256, device=device)
    keep = torch.arange(128, device=device) < torch.tensor([[128], [77]], device=device)
    tensor_mask = keep[:, None, None, :].expand(2, 1, 128, 128)  # True = may attend
    padding = masks.padding(torch.tensor([128, 77], device=device), 128)  # built outside
    cache = mh.KVCache(2, 2, 200, 32, device=device)
    with torch.no_grad():
        gqa(x[:, :100], causal=True, cache=cache)  # a prompt in the cache
    q = torch.randn(1, 4, 4096, 64, device=device, dtype=torch.bfloat16)
    window = masks.sliding_window(4096, window=256)

    def train_step():
        layer(x, causal=True).sum().backward()

    return {
        "layer_self_attention": (lambda: layer(x), None),
        "layer_causal": (lambda: layer(x, causal=True), None),
        "layer_causal_forward_backward": (train_step, None),
        "layer_bool_tensor_mask": (lambda: layer(x, mask=tensor_mask), None),
        "layer_padding_mask": (lambda: layer(x, mask=padding), None),
        "layer_gqa_rope_causal": (lambda: gqa(x, causal=True), None),
        "layer_decode_step_kv_cache": (lambda: gqa(x[:, 100:101], causal=True, cache=cache), None),
        "attention_auto_tiled_sliding_window": (lambda: mh.attention(q, q, q, mask=window), None),
        "layer_need_weights_with_mask": (
            lambda: layer(x, mask=tensor_mask, need_weights="per_head"),
            None,  # the reference kernel's empty-row check is tensor ops now
        ),
    }


SYNC_CASES = [
    "layer_self_attention",
    "layer_causal",
    "layer_causal_forward_backward",
    "layer_bool_tensor_mask",
    "layer_padding_mask",
    "layer_gqa_rope_causal",
    "layer_decode_step_kv_cache",
    "attention_auto_tiled_sliding_window",
    "layer_need_weights_with_mask",
]


@pytest.mark.skipif(not ON_CUDA, reason="torch.cuda.set_sync_debug_mode needs CUDA")
@pytest.mark.parametrize("name", SYNC_CASES)
def test_forward_does_not_synchronise_with_the_host(name, device):
    """Under torch.cuda.set_sync_debug_mode("error") any call that waits for the GPU (a
    .item(), bool() of a tensor, a copy to the host, nonzero) raises. Known syncs are xfail
    with the call that does it."""
    run, known = _sync_cases(device)[name]
    run()  # warm up: first calls may initialise libraries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if known is not None:
            with pytest.raises(RuntimeError, match="synchroniz"):
                run()
            pytest.xfail(f"known host sync: {known}")
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
