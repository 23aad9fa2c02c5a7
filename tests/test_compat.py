"""compat.MultiheadAttention against the real torch.nn.MultiheadAttention, same weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from multihead.compat import MultiheadAttention

E, H, N, L, S = 8, 2, 2, 3, 5  # embed_dim, heads, batch, query length, key length
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-8}}


def make_pair(
    seed: int = 0, randomise: bool = True, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[MultiheadAttention, nn.MultiheadAttention]:
    """Ours with random parameters (biases non-zero too) and torch's loaded from its state."""
    torch.manual_seed(seed)
    ours = MultiheadAttention(E, H, dtype=dtype, **kwargs)
    if randomise:
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.5)
    theirs = nn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def inputs(
    ours: MultiheadAttention,
    *,
    batched: bool = True,
    q_len: int = L,
    k_len: int = S,
    self_attention: bool = False,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """query, key, value in torch's layout for ``ours`` (seq-first unless batch_first)."""
    gen = torch.Generator().manual_seed(seed)

    def make(length: int, width: int) -> Tensor:
        shape = (N, length, width) if ours.batch_first else (length, N, width)
        return torch.randn(shape if batched else (length, width), generator=gen, dtype=dtype)

    if self_attention:
        x = make(q_len, E)
        return x, x, x
    return make(q_len, E), make(k_len, ours.kdim), make(k_len, ours.vdim)


def key_padding(kind: str | None, k_len: int = S, dtype: torch.dtype = torch.float32):
    """torch polarity: True = padding. Batch element 1 is padded after 2 keys."""
    if kind is None:
        return None
    mask = torch.zeros(N, k_len, dtype=torch.bool)
    mask[1, 2:] = True
    if kind == "bool":
        return mask
    bias = torch.randn(N, k_len, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return bias.masked_fill(mask, -torch.inf)


def attn_mask(kind: str | None, q_len: int = L, k_len: int = S, dtype=torch.float32):
    """torch polarity: True = blocked. Key 0 is always visible so no row is fully masked."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(11)
    shape = (q_len, k_len) if kind.startswith("2d") else (N * H, q_len, k_len)
    blocked = torch.rand(shape, generator=gen) < 0.4
    blocked[..., 0] = False
    if kind.endswith("bool"):
        return blocked
    return torch.randn(shape, generator=gen, dtype=dtype).masked_fill(blocked, -torch.inf)


def run_both(ours, theirs, args, **kwargs):
    with warnings.catch_warnings():  # torch warns about mixed bool/float masks
        warnings.simplefilter("ignore", UserWarning)
        expected = theirs(*args, **kwargs)
    return ours(*args, **kwargs), expected


def assert_same(got: tuple, expected: tuple, dtype: torch.dtype = torch.float32) -> None:
    (out, weights), (out_t, weights_t) = got, expected
    torch.testing.assert_close(out, out_t, **TOL[dtype])
    if weights_t is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, weights_t, **TOL[dtype])


# (module kwargs, call settings); every case runs with each need_weights/average setting.
CASES = {
    "self": ({}, {"self_attention": True}),
    "cross": ({}, {}),
    "cross-longer-query": ({}, {"q_len": 6, "k_len": 2}),
    "batch_first": ({"batch_first": True}, {"self_attention": True}),
    "kdim-vdim": ({"kdim": 5, "vdim": 7}, {}),
    "kdim-vdim-batch_first-masks": (
        {"kdim": 5, "vdim": 7, "batch_first": True},
        {"kpm": "bool", "mask": "3d-float"},
    ),
    "no-bias": ({"bias": False}, {"mask": "2d-bool"}),
    "bias_kv": ({"add_bias_kv": True}, {"kpm": "bool", "mask": "2d-float"}),
    "zero_attn": ({"add_zero_attn": True}, {"kpm": "float", "mask": "3d-bool"}),
    "bias_kv-zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, {"mask": "3d-float"}),
    "unbatched": ({}, {"batched": False}),
    "unbatched-masks": ({}, {"batched": False, "kpm": "bool", "mask": "3d-bool"}),
    "unbatched-batch_first-bias_kv": (
        {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True},
        {"batched": False, "kpm": "float", "mask": "2d-float"},
    ),
    "kpm-bool": ({}, {"kpm": "bool"}),
    "kpm-float": ({}, {"kpm": "float"}),
    "mask-2d-bool": ({}, {"mask": "2d-bool"}),
    "mask-2d-float": ({}, {"mask": "2d-float"}),
    "mask-3d-bool": ({}, {"mask": "3d-bool"}),
    "mask-3d-float": ({}, {"mask": "3d-float"}),
    "kpm-bool-mask-2d-bool": ({}, {"kpm": "bool", "mask": "2d-bool"}),
    "kpm-bool-mask-float-mixed": ({}, {"kpm": "bool", "mask": "3d-float"}),
    "kpm-float-mask-bool-mixed": ({}, {"kpm": "float", "mask": "2d-bool"}),
    "is_causal-with-mask": ({}, {"self_attention": True, "q_len": S, "causal_hint": True}),
    "is_causal-with-mask-kpm": (
        {"batch_first": True},
        {"self_attention": True, "q_len": S, "causal_hint": True, "kpm": "bool"},
    ),
    "dropout-eval": ({"dropout": 0.5}, {"mask": "2d-float"}),
}
WEIGHT_MODES = {"no-weights": (False, True), "mean": (True, True), "per-head": (True, False)}


def call_args(ours, setting: dict, dtype=torch.float32) -> tuple[tuple, dict]:
    q_len, k_len = setting.get("q_len", L), setting.get("k_len", S)
    if setting.get("self_attention"):
        k_len = q_len
    batched = setting.get("batched", True)
    args = inputs(
        ours,
        batched=batched,
        q_len=q_len,
        k_len=k_len,
        self_attention=setting.get("self_attention", False),
        dtype=dtype,
    )
    kpm = key_padding(setting.get("kpm"), k_len, dtype)
    mask = attn_mask(setting.get("mask"), q_len, k_len, dtype)
    kwargs: dict = {}
    if setting.get("causal_hint"):  # a true hint: the mask given IS the causal mask
        mask = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
        kwargs["is_causal"] = True
    if not batched:
        kpm = None if kpm is None else kpm[0]
        mask = None if mask is None or mask.ndim == 2 else mask[:H]
    kwargs.update(key_padding_mask=kpm, attn_mask=mask)
    return args, kwargs


@pytest.mark.parametrize("mode", WEIGHT_MODES)
@pytest.mark.parametrize("case", CASES)
def test_matches_torch(case: str, mode: str) -> None:
    module_kwargs, setting = CASES[case]
    need_weights, average = WEIGHT_MODES[mode]
    ours, theirs = make_pair(**module_kwargs)
    args, kwargs = call_args(ours, setting)
    kwargs.update(need_weights=need_weights, average_attn_weights=average)
    got, expected = run_both(ours, theirs, args, **kwargs)
    assert_same(got, expected)
    if setting.get("batched", True) is False:
        assert got[0].ndim == 2
        assert got[1] is None or got[1].ndim == (2 if average else 3)


@pytest.mark.parametrize(
    "case", ["self", "kdim-vdim-batch_first-masks", "bias_kv-zero_attn", "unbatched-masks"]
)
@pytest.mark.parametrize("need_weights", [True, False])
def test_matches_torch_float64(case: str, need_weights: bool) -> None:
    module_kwargs, setting = CASES[case]
    ours, theirs = make_pair(dtype=torch.float64, **module_kwargs)
    args, kwargs = call_args(ours, setting, dtype=torch.float64)
    got, expected = run_both(ours, theirs, args, need_weights=need_weights, **kwargs)
    assert_same(got, expected, torch.float64)


@pytest.mark.parametrize(
    "case", ["self", "kdim-vdim-batch_first-masks", "bias_kv-zero_attn", "kpm-bool-mask-2d-bool"]
)
@pytest.mark.parametrize("need_weights", [True, False])
def test_gradients_match_torch(case: str, need_weights: bool) -> None:
    module_kwargs, setting = CASES[case]
    ours, theirs = make_pair(dtype=torch.float64, **module_kwargs)
    args, kwargs = call_args(ours, setting, dtype=torch.float64)
    ours_args = [x.clone().requires_grad_() for x in args]
    theirs_args = [x.clone().requires_grad_() for x in args]
    grad_out = None
    for module, xs in ((ours, ours_args), (theirs, theirs_args)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out, weights = module(*xs, need_weights=need_weights, **kwargs)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        loss = (out * grad_out.to(out.dtype)).sum()
        if weights is not None:
            loss = loss + (weights * weights).sum()  # weights get a gradient of their own
        loss.backward()
    for x, y in zip(ours_args, theirs_args, strict=True):
        torch.testing.assert_close(x.grad, y.grad, **TOL[torch.float64])
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, **TOL[torch.float64])


@pytest.mark.parametrize("need_weights", [True, False])
def test_gradcheck_float64(need_weights: bool) -> None:
    """gradcheck through every appended key and both masks; with the weights (the reference
    kernel's pass) gradgradcheck too. Without them the fused kernel runs, whose backward, as
    in torch's module, has no derivative of its own."""
    ours, _ = make_pair(dtype=torch.float64, add_bias_kv=True, add_zero_attn=True)
    args, kwargs = call_args(ours, {"kpm": "bool", "mask": "3d-float"}, dtype=torch.float64)
    xs = tuple(x.clone().requires_grad_() for x in args)

    def layer(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        out, weights = ours(q, k, v, need_weights=need_weights, **kwargs)
        return (out,) if weights is None else (out, weights)

    assert torch.autograd.gradcheck(layer, xs)
    if need_weights:
        assert torch.autograd.gradgradcheck(layer, xs)


# -- the same module: parameters, names, initialisation ----------------------------------------
MODULE_VARIANTS = [
    {},
    {"kdim": 5, "vdim": 7},
    {"bias": False},
    {"add_bias_kv": True},
    {"kdim": 5, "bias": False, "add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
]


@pytest.mark.parametrize("module_kwargs", MODULE_VARIANTS)
def test_state_dict_and_initialisation_match_torch(module_kwargs: dict) -> None:
    torch.manual_seed(5)
    ours = MultiheadAttention(E, H, **module_kwargs)
    torch.manual_seed(5)
    theirs = nn.MultiheadAttention(E, H, **module_kwargs)
    # Same names in the same order, and (same seed, same init order) the same values.
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    # Strict loading both ways.
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for attr in (
        "embed_dim",
        "kdim",
        "vdim",
        "_qkv_same_embed_dim",
        "num_heads",
        "dropout",
        "batch_first",
        "head_dim",
        "add_zero_attn",
    ):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    for attr in ("in_proj_weight", "q_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
        assert (getattr(ours, attr) is None) == (getattr(theirs, attr) is None), attr
    assert type(ours.out_proj) is type(theirs.out_proj)  # the Linear quantize_dynamic skips


def test_default_initialisation() -> None:
    ours = MultiheadAttention(E, H, add_bias_kv=True)
    assert torch.count_nonzero(ours.in_proj_bias) == 0
    assert torch.count_nonzero(ours.out_proj.bias) == 0
    bound = (6.0 / (E + 3 * E)) ** 0.5  # xavier-uniform on the stacked (3E, E) weight
    assert ours.in_proj_weight.abs().max() <= bound
    assert ours.bias_k.std() > 0 and ours.bias_v.std() > 0


@pytest.mark.parametrize("need_weights", [True, False])
def test_matches_torch_fast_path(need_weights: bool) -> None:
    """torch's inference fast path (no_grad, eval, batch_first, self-attention)."""
    ours, theirs = make_pair(batch_first=True)
    x = inputs(ours, self_attention=True, q_len=S)[0]
    with torch.no_grad():
        got, expected = run_both(
            ours, theirs, (x, x, x), key_padding_mask=key_padding("bool"), need_weights=need_weights
        )
    assert_same(got, expected)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 5),
    k_len=st.integers(1, 5),
    heads=st.sampled_from([1, 2, 4]),
    batch_first=st.booleans(),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    use_kpm=st.booleans(),
)
def test_matches_torch_property(
    batch,
    q_len,
    k_len,
    heads,
    batch_first,
    add_bias_kv,
    add_zero_attn,
    need_weights,
    average,
    use_kpm,
) -> None:
    torch.manual_seed(batch * 100 + q_len * 10 + k_len)
    kwargs = {
        "batch_first": batch_first,
        "add_bias_kv": add_bias_kv,
        "add_zero_attn": add_zero_attn,
    }
    ours = MultiheadAttention(E, heads, **kwargs).eval()
    theirs = nn.MultiheadAttention(E, heads, **kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    shape = (batch, q_len, E) if batch_first else (q_len, batch, E)
    kv_shape = (batch, k_len, E) if batch_first else (k_len, batch, E)
    q, k, v = torch.randn(shape), torch.randn(kv_shape), torch.randn(kv_shape)
    kpm = None
    if use_kpm:  # pad some keys, always leaving key 0 visible
        kpm = torch.rand(batch, k_len) < 0.5
        kpm[:, 0] = False
    got, expected = run_both(
        ours,
        theirs,
        (q, k, v),
        key_padding_mask=kpm,
        need_weights=need_weights,
        average_attn_weights=average,
    )
    assert_same(got, expected)


# -- what it fixes -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_row_gives_zero_not_nan(kind: str, need_weights: bool) -> None:
    """key_padding_mask blocks every key of batch element 1: that row attends to nothing."""
    ours, theirs = make_pair(randomise=False)  # default init: out_proj.bias is 0
    q, k, v = (x.requires_grad_() for x in inputs(ours))
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1] = True
    if kind == "float":
        kpm = torch.zeros(N, S).masked_fill(kpm, -torch.inf)
    out, weights = ours(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    out_t, weights_t = theirs(q, k, v, key_padding_mask=kpm, need_weights=need_weights)

    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))  # seq-first: (L, N, E)
    torch.testing.assert_close(out[:, 0], out_t[:, 0], **TOL[torch.float32])
    if need_weights:
        assert torch.equal(weights[1], torch.zeros_like(weights[1]))
        torch.testing.assert_close(weights[0], weights_t[0], **TOL[torch.float32])
    if out_t[:, 1].isnan().any():  # torch's fault, where it has it (need_weights=True)
        assert need_weights

    out.sum().backward()
    for tensor in (q, k, v, *ours.parameters()):
        assert torch.isfinite(tensor.grad).all()


def test_fully_masked_row_with_bias_gives_out_proj_bias() -> None:
    """The heads give 0, so the layer gives W^O·0 + b = out_proj.bias."""
    ours, _ = make_pair()
    q, k, v = inputs(ours)
    blocked = torch.zeros(L, S, dtype=torch.bool)
    blocked[2] = True  # query 2 may see no key
    out, weights = ours(q, k, v, attn_mask=blocked)
    torch.testing.assert_close(out[2], ours.out_proj.bias.expand(N, E).detach())
    assert torch.equal(weights[:, 2], torch.zeros(N, S))


@pytest.mark.parametrize(
    "module_kwargs,setting",
    [
        ({}, {"need_weights": True}),
        ({}, {"need_weights": False}),
        ({"batch_first": True}, {"kpm": True}),
        ({}, {"q_len": 3, "k_len": 5}),  # top-left, as torch's SDPA is_causal
        ({"add_bias_kv": True, "add_zero_attn": True}, {"kpm": True}),
    ],
)
def test_is_causal_without_attn_mask(module_kwargs: dict, setting: dict) -> None:
    """is_causal=True alone equals torch given the explicit causal mask."""
    ours, theirs = make_pair(**module_kwargs)
    q_len, k_len = setting.get("q_len", S), setting.get("k_len", S)
    args = inputs(ours, q_len=q_len, k_len=k_len)
    kpm = key_padding("bool", k_len) if setting.get("kpm") else None
    need_weights = setting.get("need_weights", True)
    got = ours(*args, key_padding_mask=kpm, need_weights=need_weights, is_causal=True)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)  # torch: True = blocked
    expected = theirs(*args, key_padding_mask=kpm, need_weights=need_weights, attn_mask=causal)
    assert_same(got, expected)


def test_is_causal_is_a_hint_the_attn_mask_given_is_applied() -> None:
    """A wrong hint does not change the answer: the attn_mask given is what counts."""
    ours, theirs = make_pair()
    args = inputs(ours, self_attention=True, q_len=S)
    not_causal = attn_mask("2d-bool", S, S)
    for need_weights in (True, False):
        got = ours(*args, attn_mask=not_causal, is_causal=True, need_weights=need_weights)
        expected = theirs(*args, attn_mask=not_causal, need_weights=need_weights)
        assert_same(got, expected)


def test_dropout_only_in_training_and_weights_before_dropout() -> None:
    ours, _ = make_pair(dropout=0.5)
    q, k, v = inputs(ours)
    eval_out, _ = ours(q, k, v)
    torch.testing.assert_close(ours(q, k, v)[0], eval_out, rtol=0, atol=0)
    ours.train()
    torch.manual_seed(0)
    train_out, weights = ours(q, k, v)
    assert not torch.allclose(train_out, eval_out)
    torch.testing.assert_close(weights.sum(-1), torch.ones(N, L))  # the distribution itself


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"embed_dim": 10, "num_heads": 4}, ValueError, "embed_dim.*divisible by num_heads"),
        ({"embed_dim": 8, "num_heads": 0}, ValueError, "num_heads"),
        ({"embed_dim": 8.0, "num_heads": 2}, TypeError, "embed_dim"),
        ({"embed_dim": 8, "num_heads": 2, "dropout": 1.5}, ValueError, "dropout"),
        ({"embed_dim": 8, "num_heads": 2, "kdim": 0}, ValueError, "kdim"),
    ],
)
def test_bad_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MultiheadAttention(**kwargs)


def _bad_calls():
    q, k, v = torch.randn(L, N, E), torch.randn(S, N, E), torch.randn(S, N, E)
    ok = {"query": q, "key": k, "value": v}
    kpm, mask = torch.zeros(N, S, dtype=torch.bool), torch.zeros(L, S, dtype=torch.bool)
    return [
        ({"query": torch.randn(L, N, 6)}, ValueError, "query has 6 features"),
        ({"key": torch.randn(S, N, 6)}, ValueError, "key has 6 features"),
        ({"value": torch.randn(S, N, 6)}, ValueError, "value has 6 features"),
        ({"query": torch.randn(1, L, N, E)}, ValueError, "query must be 2-D"),
        ({"key": torch.randn(S, E)}, ValueError, "key is 2-D but query is 3-D"),
        ({"key": torch.randn(S, N + 1, E), "value": torch.randn(S, N + 1, E)}, ValueError, "batch"),
        ({"value": torch.randn(S + 1, N, E)}, ValueError, "key has shape .* and value"),
        ({"query": q.long()}, TypeError, "query must be a floating-point"),
        ({"query": q.double()}, TypeError, "query has dtype torch.float64"),
        ({"query": q.tolist()}, TypeError, "query must be a torch.Tensor"),
        ({"key_padding_mask": kpm.T}, ValueError, r"key_padding_mask has shape \(5, 2\)"),
        ({"key_padding_mask": kpm.long()}, TypeError, "key_padding_mask must be bool"),
        ({"key_padding_mask": [[0] * S] * N}, TypeError, "key_padding_mask must be a torch"),
        ({"attn_mask": mask[:, :-1]}, ValueError, r"attn_mask has shape \(3, 4\)"),
        ({"attn_mask": torch.zeros(N, L, S)}, ValueError, r"attn_mask .*N\*num_heads"),
        ({"attn_mask": torch.zeros(1, L, S)}, ValueError, "attn_mask has shape"),
        ({"attn_mask": mask.int()}, TypeError, "attn_mask must be bool"),
        ({"is_causal": 1}, TypeError, "is_causal"),
    ], ok


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])))
def test_bad_forward(index: int) -> None:
    cases, ok = _bad_calls()
    change, error, match = cases[index]
    module = MultiheadAttention(E, H)
    with pytest.raises(error, match=match):
        module(**{**ok, **change})


def test_bad_unbatched_masks() -> None:
    module = MultiheadAttention(E, H)
    q, k = torch.randn(L, E), torch.randn(S, E)
    with pytest.raises(ValueError, match=r"key_padding_mask .*\(S,\)"):
        module(q, k, k, key_padding_mask=torch.zeros(1, S, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask .*num_heads, L, S"):
        module(q, k, k, attn_mask=torch.zeros(H + 1, L, S))


def test_is_causal_hint_does_not_skip_the_attn_mask_check() -> None:
    """With is_causal=True the attn_mask given is still what is applied, so it is checked: one
    made for another length raises, with or without weights."""
    module = MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    wrong = nn.Transformer.generate_square_subsequent_mask(L + 1)
    for need_weights in (True, False):
        with pytest.raises(ValueError, match=r"attn_mask has shape \(4, 4\)"):
            module(x, x, x, attn_mask=wrong, is_causal=True, need_weights=need_weights)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_tensor_input_is_refused(layout: torch.layout) -> None:
    module = MultiheadAttention(E, H, batch_first=True).eval()
    nested = torch.nested.nested_tensor([torch.randn(2, E), torch.randn(3, E)], layout=layout)
    with torch.no_grad(), pytest.raises(TypeError, match="nested tensor"):
        module(nested, nested, nested)
