"""compat.MultiheadAttention in torch's toolchain: isinstance, merge_masks, the encoder layer's
fast path, dynamic quantization, TorchScript, torch.jit.trace, truthy flags and mixed bias
dtypes. Every answer is compared with torch's nn.MultiheadAttention holding the same weights."""

import copy
import io
import warnings

import pytest
import torch
from test_compat import E, H, L, N, S, make_pair
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from multihead.compat import MultiheadAttention

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-8}}

# torch.jit.trace and torch.jit.script say they are deprecated; that is not under test here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_inputs(
    module: nn.MultiheadAttention, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """query (L rows), key and value (S rows) in the module's layout, batch N."""
    gen = torch.Generator().manual_seed(seed)

    def make(length: int, width: int) -> Tensor:
        shape = (N, length, width) if module.batch_first else (length, N, width)
        return torch.randn(shape, generator=gen, dtype=dtype)

    return make(L, E), make(S, module.kdim), make(S, module.vdim)


def make_masks(kind: str, seed: int) -> dict[str, Tensor]:
    """torch's masks (True = blocked, or an additive float), no row fully masked."""
    gen = torch.Generator().manual_seed(seed)
    padding = torch.rand(N, S, generator=gen) < 0.4
    padding[:, 0] = False
    blocked = torch.rand(N * H, L, S, generator=gen) < 0.4
    blocked[..., 0] = False
    return {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "attn-2d-bool": {"attn_mask": blocked[0]},
        "attn-3d-float": {"attn_mask": torch.randn(N * H, L, S, generator=gen)},
        "both-float": {
            "key_padding_mask": torch.zeros(N, S).masked_fill(padding, -torch.inf),
            "attn_mask": torch.randn(L, S, generator=gen),
        },
    }[kind]


class Call(nn.Module):
    """The layer called with fixed keyword arguments, returning tensors only (what trace takes)."""

    def __init__(self, layer: nn.Module, **kwargs: object) -> None:
        super().__init__()
        self.layer, self.kwargs = layer, kwargs

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        out, weights = self.layer(query, key, value, **self.kwargs)
        return (out,) if weights is None else (out, weights)


def assert_same(got, expected, dtype: torch.dtype = torch.float32) -> None:
    (out, weights), (out_t, weights_t) = got, expected
    assert out.dtype == out_t.dtype
    torch.testing.assert_close(out, out_t, **TOL[dtype])
    if weights_t is None:
        assert weights is None
    else:
        assert weights.dtype == weights_t.dtype
        torch.testing.assert_close(weights, weights_t, **TOL[dtype])


# -- what torch's tools look for ---------------------------------------------------------------
def test_is_a_torch_multihead_attention_with_torchs_out_proj_type() -> None:
    """isinstance holds (quantization mappings, FSDP wrap policies, user code), and W^O is the
    Linear subclass quantize_dynamic skips, as in torch's module."""
    ours, theirs = make_pair()
    assert isinstance(ours, nn.MultiheadAttention)
    assert type(ours.out_proj) is type(theirs.out_proj) is NonDynamicallyQuantizableLinear
    assert isinstance(ours.out_proj, nn.Linear)


MERGE_ATTN = ["none", "bool_2d", "float_2d", "bool_3d", "float_3d"]
MERGE_PADDING = ["none", "bool", "float"]


@pytest.mark.parametrize("padding", MERGE_PADDING)
@pytest.mark.parametrize("attn", MERGE_ATTN)
def test_merge_masks_keeps_torchs_contract(attn: str, padding: str) -> None:
    """`merge_masks` returns what torch's does (mask, its dtype and shape, and the mask type)
    for the same masks, in torch's polarity."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    ours = MultiheadAttention(16, 4, batch_first=True)
    query = torch.randn(3, 5, 16)
    attn_mask = {
        "none": None,
        "bool_2d": torch.rand(5, 5) < 0.3,
        "float_2d": torch.randn(5, 5),
        "bool_3d": torch.rand(12, 5, 5) < 0.3,
        "float_3d": torch.randn(12, 5, 5),
    }[attn]
    key_padding_mask = {
        "none": None,
        "bool": torch.rand(3, 5) < 0.3,
        "float": torch.randn(3, 5),
    }[padding]
    want, want_type = ref.merge_masks(attn_mask, key_padding_mask, query)
    got, got_type = ours.merge_masks(attn_mask, key_padding_mask, query)
    assert got_type == want_type
    if want is None:
        assert got is None
    else:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def encoder_layer_pair(
    batch_first: bool, norm_first: bool = False
) -> tuple[nn.TransformerEncoderLayer, nn.TransformerEncoderLayer]:
    """torch's encoder layer, and a twin with the same weights whose self_attn is ours."""
    torch.manual_seed(0)
    options = {"dropout": 0.0, "batch_first": batch_first, "norm_first": norm_first}
    theirs = nn.TransformerEncoderLayer(16, 4, 32, **options).eval()
    ours = nn.TransformerEncoderLayer(16, 4, 32, **options).eval()
    ours.load_state_dict(theirs.state_dict())
    ours.self_attn = MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours.self_attn.load_state_dict(theirs.self_attn.state_dict(), strict=True)
    return ours, theirs


def encoder_inputs(batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """src (batch 3, length 5, width 16) in the layout, a causal float src_mask, and a bool
    padding mask (batch element 1 padded after 3 keys)."""
    src = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    src = src if batch_first else src.transpose(0, 1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    return src, nn.Transformer.generate_square_subsequent_mask(5), padding


def count_calls(module: nn.Module, *names: str) -> dict[str, int]:
    """Count the calls of ``module``'s methods ``names`` from now on (no hooks: a hook
    would turn the encoder layer's fast path off)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        method = getattr(module, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            counts[_name] += 1
            return _method(*args, **kwargs)

        setattr(module, name, counted)
    return counts


@pytest.mark.parametrize(
    "path,batch_first,norm_first",
    [("fast", True, False), ("fast", True, True), ("slow", True, False), ("slow", False, True)],
)
@pytest.mark.parametrize("masks", ["padding", "both", "both-float"])
def test_encoder_layer_holding_it_equals_torchs(
    path: str, batch_first: bool, norm_first: bool, masks: str
) -> None:
    """In eval under no_grad with batch_first, nn.TransformerEncoderLayer takes its fused fast
    path, which reads our weights and calls our merge_masks; otherwise it calls our forward.
    Either way its output is that of the layer holding torch's module."""
    ours, theirs = encoder_layer_pair(batch_first, norm_first)
    src, causal, padding = encoder_inputs(batch_first)
    kwargs = {"src_key_padding_mask": padding}
    if masks == "both-float":  # a float padding mask too
        kwargs["src_key_padding_mask"] = torch.zeros(padding.shape).masked_fill(padding, -1e9)
    if masks != "padding":
        kwargs["src_mask"] = causal
    calls = count_calls(ours.self_attn, "_forward", "merge_masks")
    with warnings.catch_warnings():  # torch: a float src_mask with a bool padding mask
        warnings.simplefilter("ignore", UserWarning)
        with torch.set_grad_enabled(path == "slow"):
            got, want = ours(src, **kwargs), theirs(src, **kwargs)
    fast = path == "fast"
    assert calls == {"_forward": int(not fast), "merge_masks": int(fast)}
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def with_our_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every torch nn.MultiheadAttention is ours, same weights."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                ours = MultiheadAttention(
                    child.embed_dim,
                    child.num_heads,
                    bias=child.in_proj_bias is not None,
                    batch_first=child.batch_first,
                )
                ours.load_state_dict(child.state_dict(), strict=True)
                setattr(parent, name, ours.train(child.training))
    return twin


def transformer_masks(kind: str) -> dict[str, Tensor | bool]:
    """nn.Transformer's masks for source length 5 and target length 4, batch 3 (torch's
    polarity); batch element 1 of the source and 2 of the target are padded."""
    source_padding = torch.zeros(3, 5, dtype=torch.bool)
    source_padding[1, 3:] = True
    target_padding = torch.zeros(3, 4, dtype=torch.bool)
    target_padding[2, 2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    return {
        "none": {},
        "causal-bool": {"tgt_mask": torch.ones(4, 4, dtype=torch.bool).triu(1)},
        "causal-float-padding": {
            "tgt_mask": causal,
            "src_key_padding_mask": source_padding,
            "tgt_key_padding_mask": target_padding,
            "memory_key_padding_mask": source_padding,
        },
        "tgt_is_causal-padding": {
            "tgt_mask": causal,
            "tgt_is_causal": True,
            "src_key_padding_mask": source_padding,
            "memory_key_padding_mask": source_padding,
        },
    }[kind]


@pytest.mark.parametrize(
    "masks", ["none", "causal-bool", "causal-float-padding", "tgt_is_causal-padding"]
)
@pytest.mark.parametrize(
    "batch_first,norm_first,training",
    [(True, False, False), (False, True, False), (True, True, True), (False, False, True)],
)
def test_transformer_holding_it_equals_torchs(
    batch_first: bool, norm_first: bool, training: bool, masks: str
) -> None:
    """nn.Transformer with ours in every attention (encoder self-attention, decoder self- and
    cross-attention) gives torch's output; in training, torch's gradients too. In eval under
    no_grad its encoder takes torch's fused fast path on our weights where it can."""
    torch.manual_seed(0)
    options = {"dropout": 0.0, "batch_first": batch_first, "norm_first": norm_first}
    with warnings.catch_warnings():  # torch: why its encoder won't use nested tensors
        warnings.simplefilter("ignore", UserWarning)
        theirs = nn.Transformer(16, 4, 2, 2, 32, **options).train(training)
    ours = with_our_attention(theirs)
    assert type(ours.decoder.layers[1].multihead_attn) is MultiheadAttention
    gen = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(3, 5, 16, generator=gen), torch.randn(3, 4, 16, generator=gen)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    kwargs = transformer_masks(masks)
    with warnings.catch_warnings():  # torch: a float tgt_mask with bool padding masks
        warnings.simplefilter("ignore", UserWarning)
        with torch.set_grad_enabled(training):
            got, want = ours(src, tgt, **kwargs), theirs(src, tgt, **kwargs)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    if training:
        got.square().sum().backward()
        want.square().sum().backward()
        theirs_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, theirs_params[name].grad, atol=1e-4, rtol=1e-4)


def test_encoder_with_nested_tensors_holding_it_equals_torchs() -> None:
    """nn.TransformerEncoder(enable_nested_tensor=True) in eval under no_grad packs a padded
    batch into a nested tensor for torch's fused layer, which reads our weights: same output
    as torch's module, and our forward is never called with a nested tensor."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    ours = with_our_attention(theirs)
    calls = [count_calls(block.self_attn, "_forward") for block in ours.layers]
    src = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 2:] = True
    with torch.no_grad():
        got = ours(src, src_key_padding_mask=padding)
        want = theirs(src, src_key_padding_mask=padding)
    assert calls == [{"_forward": 0}, {"_forward": 0}]
    torch.testing.assert_close(got, want, **TOL[torch.float32])


class Block(nn.Module):
    """Attention then a feed-forward Linear: what quantize_dynamic({nn.Linear}) meets."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention, self.feed_forward = attention, nn.Linear(E, E)

    def forward(self, x: Tensor) -> Tensor:
        return self.feed_forward(self.attention(x, x, x, need_weights=False)[0])


@pytest.mark.filterwarnings("ignore")  # torch's notes on its quantization API's future
def test_dynamic_quantization_leaves_out_proj_and_matches_torchs() -> None:
    """quantize_dynamic over nn.Linear quantizes the feed-forward Linear but leaves our W^O
    alone, as it does torch's; the quantized output stays near the float one, and equals that
    of the same model holding torch's module, quantized alike."""
    ours, theirs = make_pair(batch_first=True)
    torch.manual_seed(1)
    model = Block(ours).eval()
    reference = Block(theirs).eval()
    reference.feed_forward.load_state_dict(model.feed_forward.state_dict())
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear})
    quantized_ref = torch.ao.quantization.quantize_dynamic(reference, {nn.Linear})

    assert type(quantized.attention) is MultiheadAttention
    assert type(quantized.attention.out_proj) is NonDynamicallyQuantizableLinear
    assert type(quantized.feed_forward) is type(quantized_ref.feed_forward)
    assert type(quantized.feed_forward) is not nn.Linear  # it was quantized
    x = make_inputs(ours, seed=2)[0]
    got, float_out = quantized(x), model(x)
    assert not torch.equal(got, float_out)  # the quantized Linear changed something
    torch.testing.assert_close(got, float_out, atol=0.05, rtol=0.05)
    torch.testing.assert_close(got, quantized_ref(x), **TOL[torch.float32])


# -- TorchScript -------------------------------------------------------------------------------
# (module kwargs, masks, call kwargs)
SCRIPT_CASES = {
    "self-seq-first": ({}, "none", {}),
    "batch_first-padding-per-head": (
        {"batch_first": True},
        "padding",
        {"average_attn_weights": False},
    ),
    "kdim-vdim-3d-no-weights": ({"kdim": 5, "vdim": 7}, "attn-3d-float", {"need_weights": False}),
    "bias_kv-zero_attn-both-per-head": (
        {"add_bias_kv": True, "add_zero_attn": True},
        "both-float",
        {"average_attn_weights": False},
    ),
    "no-bias-2d-bool-no-weights": ({"bias": False}, "attn-2d-bool", {"need_weights": False}),
}


@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_torch_jit_script_runs_our_forward(case: str) -> None:
    """torch.jit.script compiles the layer (its forward calls our Python implementation) and
    the scripted layer gives eager's answers, which are torch's."""
    module_kwargs, masks, call_kwargs = SCRIPT_CASES[case]
    ours, theirs = make_pair(**module_kwargs)
    scripted = torch.jit.script(ours)
    assert isinstance(scripted, torch.jit.ScriptModule)
    kwargs = {**make_masks(masks, seed=3), **call_kwargs}
    args = make_inputs(ours, seed=4)
    with warnings.catch_warnings():  # torch: a float mask with a bool one
        warnings.simplefilter("ignore", UserWarning)
        want = theirs(*args, **kwargs)
    assert_same(scripted(*args, **kwargs), want)
    assert_same(ours(*args, **kwargs), want)


def test_torch_jit_script_compiles_merge_masks_for_the_encoder_layer() -> None:
    """A scripted encoder layer compiles our merge_masks (its fast path calls it) as
    TorchScript, which keeps torch's contract."""
    ours, theirs = encoder_layer_pair(batch_first=True)
    scripted = torch.jit.script(ours).self_attn
    assert "merge_masks" in scripted._c._method_names()
    src, causal, padding = encoder_inputs(batch_first=True)
    for attn_mask, key_padding_mask in ((causal, padding), (None, padding), (causal, None)):
        got, got_type = scripted.merge_masks(attn_mask, key_padding_mask, src)
        want, want_type = theirs.self_attn.merge_masks(attn_mask, key_padding_mask, src)
        assert got_type == want_type
        assert torch.equal(got, want)


def test_a_scripted_layer_cannot_be_saved() -> None:
    """The documented limitation: the scripted forward calls Python, which TorchScript cannot
    serialise. (If this starts passing, update the class docstring.)"""
    scripted = torch.jit.script(make_pair()[0])
    with pytest.raises(RuntimeError, match="Python function"):
        torch.jit.save(scripted, io.BytesIO())


@pytest.mark.parametrize("path,batch_first", [("fast", True), ("slow", True), ("slow", False)])
def test_torch_jit_script_of_an_encoder_layer_holding_it(path: str, batch_first: bool) -> None:
    """A scripted nn.TransformerEncoderLayer holding ours equals the eager layer holding
    torch's: on its fused fast path (eval, no_grad, batch_first) and on the one calling our
    forward."""
    ours, theirs = encoder_layer_pair(batch_first)
    scripted = torch.jit.script(ours)
    src, causal, padding = encoder_inputs(batch_first)
    with torch.set_grad_enabled(path == "slow"):
        for kwargs in ({}, {"src_key_padding_mask": padding}, {"src_mask": causal}):
            with torch.autograd.profiler.profile() as profile:
                got = scripted(src, **kwargs)
            ops = {event.name for event in profile.function_events}
            assert ("aten::_transformer_encoder_layer_fwd" in ops) == (path == "fast")
            torch.testing.assert_close(got, theirs(src, **kwargs), **TOL[torch.float32])


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_jit_script_of_an_encoder_holding_it(batch_first: bool) -> None:
    """nn.TransformerEncoder of such layers (two copies of the layer) scripts and equals the
    encoder built from torch's layer, with and without a padding mask."""
    ours_layer, theirs_layer = encoder_layer_pair(batch_first)
    ours = nn.TransformerEncoder(ours_layer, 2, enable_nested_tensor=False).eval()
    theirs = nn.TransformerEncoder(theirs_layer, 2, enable_nested_tensor=False).eval()
    assert all(type(layer.self_attn) is MultiheadAttention for layer in ours.layers)
    scripted = torch.jit.script(ours)
    src, _, padding = encoder_inputs(batch_first)
    for kwargs in ({}, {"src_key_padding_mask": padding}):
        torch.testing.assert_close(
            scripted(src, **kwargs), theirs(src, **kwargs), **TOL[torch.float32]
        )


# -- torch.jit.trace ---------------------------------------------------------------------------
TRACE_CASES = {
    "self-weights": ({}, "none", {"need_weights": True}),
    "batch_first-padding-no-weights": ({"batch_first": True}, "padding", {"need_weights": False}),
    "kdim-vdim-3d-per-head": (
        {"kdim": 5, "vdim": 7},
        "attn-3d-float",
        {"average_attn_weights": False},
    ),
    "bias_kv-zero_attn-both": ({"add_bias_kv": True, "add_zero_attn": True}, "both-float", {}),
    "causal-no-weights": ({}, "none", {"is_causal": True, "need_weights": False}),
    "causal-bias_kv": ({"add_bias_kv": True}, "none", {"is_causal": True}),
    "2d-bool": ({"bias": False}, "attn-2d-bool", {}),
}


def trace(call: nn.Module, args: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    """torch.jit.trace with its default check (a second trace under no_grad, compared), every
    TracerWarning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)  # torch: a float mask with a bool one
        return torch.jit.trace(call, args)


@pytest.mark.parametrize("case", TRACE_CASES)
def test_torch_jit_trace_passes_its_check_and_equals_eager(case: str) -> None:
    """The traced graph is the same with and without autograd (the check passes), records no
    Python value read from a tensor, and replays eager's (torch's) answers on new inputs of
    the same shapes."""
    module_kwargs, masks, call_kwargs = TRACE_CASES[case]
    ours, theirs = make_pair(**module_kwargs)
    mask_kwargs = make_masks(masks, seed=6)
    traced = trace(Call(ours, **mask_kwargs, **call_kwargs), make_inputs(ours, seed=7))
    new = make_inputs(ours, seed=8)
    expected_kwargs = dict(mask_kwargs, **call_kwargs)
    if call_kwargs.get("is_causal"):  # torch needs the mask itself
        expected_kwargs["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = Call(theirs, **expected_kwargs)(*new)
    got = traced(*new)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for a, b in zip(got, Call(ours, **mask_kwargs, **call_kwargs)(*new), strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_a_traced_layer_has_eagers_gradients() -> None:
    """The trace records out-of-place ops, so autograd runs through it: the gradients of a
    loss through the traced layer are those through torch's module."""
    ours, theirs = make_pair(dtype=torch.float64, batch_first=True)
    masks = make_masks("padding", seed=9)
    traced = trace(Call(ours, **masks), make_inputs(ours, seed=10, dtype=torch.float64))
    inputs = make_inputs(ours, seed=11, dtype=torch.float64)
    grads = []
    for module in (traced, Call(theirs, **masks)):
        xs = [x.clone().requires_grad_() for x in inputs]
        out, weights = module(*xs)
        (out.square().sum() + weights.square().sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


# -- the documented fixes, scripted and traced (eager: tests/test_compat.py) ---------------------
def run_as(mode: str, module: MultiheadAttention, args: tuple[Tensor, ...], **kwargs):
    """(output, weights) from ``module`` scripted or traced."""
    call = Call(module, **kwargs)
    if mode == "script":
        call.layer = torch.jit.script(module)
    else:
        call = trace(call, args)
    result = call(*args)
    return result[0], result[1] if len(result) == 2 else None


@pytest.mark.parametrize("mode", ["script", "trace"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_give_zero_not_nan(mode: str, need_weights: bool) -> None:
    """Batch element 1 may see no key: its heads give 0, so the layer gives out_proj.bias,
    and its weights are 0 (torch gives NaN there); the other rows are torch's."""
    ours, theirs = make_pair(batch_first=True)
    args = make_inputs(ours, seed=12)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[1] = True
    kwargs = {"key_padding_mask": padding, "need_weights": need_weights}
    out, weights = run_as(mode, ours, args, **kwargs)
    out_t, weights_t = theirs(*args, **kwargs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], ours.out_proj.bias.detach().expand(L, E))
    torch.testing.assert_close(out[0], out_t[0], **TOL[torch.float32])
    if need_weights:
        assert torch.equal(weights[1], torch.zeros_like(weights[1]))
        torch.testing.assert_close(weights[0], weights_t[0], **TOL[torch.float32])
    else:
        assert weights is None


@pytest.mark.parametrize("mode", ["script", "trace"])
@pytest.mark.parametrize("module_kwargs", [{}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_is_causal_without_attn_mask(mode: str, module_kwargs: dict) -> None:
    """is_causal=True alone equals torch given the explicit (top-left) causal mask."""
    ours, theirs = make_pair(**module_kwargs)
    args = make_inputs(ours, seed=13)
    got = run_as(mode, ours, args, is_causal=True)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)  # torch: True = blocked
    assert_same(got, theirs(*args, attn_mask=causal))


# -- flags and dtypes as torch reads them ------------------------------------------------------
def test_truthy_flags_read_as_torch_reads_them() -> None:
    """torch takes any value with a truth value for need_weights, average_attn_weights and
    the constructor's flags (``need_weights=0``); is_causal must be a bool in both."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=1)
    ours = MultiheadAttention(16, 4, batch_first=1)
    assert ours.batch_first is True
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 16)
    want = ref(x, x, x, need_weights=0)
    got = ours(x, x, x, need_weights=0)
    assert got[1] is None and want[1] is None
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    got_w = ours(x, x, x, need_weights=1, average_attn_weights=0)[1]
    want_w = ref(x, x, x, need_weights=1, average_attn_weights=0)[1]
    assert got_w.shape == want_w.shape == (2, 4, 5, 5)
    torch.testing.assert_close(got_w, want_w, **TOL[torch.float32])
    got_w = ours(x, x, x, need_weights="yes", average_attn_weights=1)[1]
    assert got_w.shape == (2, 5, 5)
    with pytest.raises(TypeError, match="is_causal"):
        ours(x, x, x, is_causal=1)


MIXED_BIAS = [
    (torch.float64, torch.float16),
    (torch.float64, torch.bfloat16),
    (torch.float64, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.float64),
]


def with_bias_dtype(module: nn.MultiheadAttention, dtype: torch.dtype) -> None:
    module.in_proj_bias = nn.Parameter(module.in_proj_bias.detach().to(dtype))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dtype,bias_dtype", MIXED_BIAS)
def test_mixed_in_proj_bias_dtype_as_torch(dtype, bias_dtype, need_weights, grad) -> None:
    """An in_proj_bias of another float dtype than the weights: torch's module (batch_first,
    grad or not) adds it in the weights' dtype and answers in that dtype; so do we. In the
    sequence-first layout, where torch's contiguous projection refuses it, we give the same
    answer as in batch_first."""
    ours, theirs = make_pair(dtype=dtype, batch_first=True)
    for module in (ours, theirs):
        with_bias_dtype(module, bias_dtype)
    args = make_inputs(ours, seed=14, dtype=dtype)
    with torch.set_grad_enabled(grad):
        got = ours(*args, need_weights=need_weights)
        want = theirs(*args, need_weights=need_weights)
        assert got[0].dtype == want[0].dtype == dtype
        assert_same(got, want, dtype)
        seq_first, _ = make_pair(dtype=dtype)
        seq_first.load_state_dict(ours.state_dict())
        with_bias_dtype(seq_first, bias_dtype)
        out, weights = seq_first(*(x.transpose(0, 1) for x in args), need_weights=need_weights)
    assert_same((out.transpose(0, 1), weights), want, dtype)


def test_mixed_bias_kv_dtype_as_torch() -> None:
    """A lower-precision bias_k/bias_v is appended in the keys' dtype, as torch's cat does."""
    ours, theirs = make_pair(dtype=torch.float64, add_bias_kv=True)
    for module in (ours, theirs):
        module.bias_k = nn.Parameter(module.bias_k.detach().half())
        module.bias_v = nn.Parameter(module.bias_v.detach().half())
    args = make_inputs(ours, seed=15, dtype=torch.float64)
    for need_weights in (True, False):
        got = ours(*args, need_weights=need_weights)
        assert_same(got, theirs(*args, need_weights=need_weights), torch.float64)
