"""Numerics: extreme logits, fully masked rows, and the training loop's non-finite guard.

Extreme logits are |score| up to 1e4 (with the default 1/sqrt(d) scale), in float32 and
bfloat16, in every kernel; the oracle is the reference kernel in float64 on the same rounded
inputs. The softmax of such scores is only as exact as the scores themselves: a float32
score of 1e4 carries an absolute rounding error of ~5e-4, which becomes a relative error of
the weights of the same size, so the tolerance grows with |score| (`_tolerance`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from multihead import MultiHeadAttention, attention, compat, masks
from multihead.training import TrainConfig, Trainer, read_log

KERNELS = ["sdpa", "reference", "tiled"]
DTYPES = [torch.float32, torch.bfloat16]
EXTREME = 1e4
B, H, Q, K, D = 2, 2, 5, 7, 8


def _tolerance(dtype: torch.dtype, max_score: float) -> dict[str, float]:
    """Inputs' own rounding is shared with the oracle; what is left is the kernel computing
    the scores in float32 (relative 2^-24 of |score|) and rounding the output to ``dtype``."""
    score_error = 8 * max_score * 2.0**-24
    output = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    return {"atol": score_error + output, "rtol": output}


def _extreme(regime: str, sign: float, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """float64 q, k, v whose scores reach |EXTREME|.

    "separated": random directions scaled up, so each row has one clear winner (a one-hot
    softmax). "ties": every score is sign·EXTREME plus an O(1) spread, so the weights are
    spread over several keys and the result depends on the scores' last digits.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, K, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, K, D, generator=g, dtype=torch.float64)
    if regime == "separated":
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        c = math.sqrt(EXTREME / float(scores.abs().max()))
        return q * c, k * c * sign, v
    q, k = q * 0.5, k * 0.5
    q[..., 0] = 100.0
    k[..., 0] = sign * EXTREME * math.sqrt(D) / 100.0
    return q, k, v


CASES = [
    pytest.param(regime, sign, id=f"{regime}{'+' if sign > 0 else '-'}")
    for regime in ("separated", "ties")
    for sign in (1.0, -1.0)
]


MASKS = {
    "none": {},
    "causal": {"causal": True},
    "padding": {"mask": masks.padding([7, 4], max_len=7, q_len=5)},
    "bias": {"mask": torch.linspace(-EXTREME, 0.0, 35).view(5, 7)},  # a huge additive bias
}


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize(("regime", "sign"), CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_extreme_logits_match_the_float64_reference(kernel, dtype, regime, sign, mask):
    q64, k64, v64 = _extreme(regime, sign)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    kwargs = MASKS[mask]
    out = attention(q, k, v, kernel=kernel, **kwargs)
    assert torch.isfinite(out).all()
    oracle_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle_kwargs = dict(kwargs)
    if isinstance(kwargs.get("mask"), Tensor):
        oracle_kwargs["mask"] = kwargs["mask"].double()
    expected = attention(*oracle_inputs, kernel="reference", **oracle_kwargs)
    scores = q.detach().double() @ k.detach().double().transpose(-2, -1) / math.sqrt(D)
    max_score = float(scores.abs().max())
    assert max_score > 0.98 * EXTREME  # the inputs' rounding (bf16) may shave a little off
    torch.testing.assert_close(out.double(), expected, **_tolerance(dtype, max_score))

    out.float().square().sum().backward()
    expected.square().sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    # dV = Pᵀ dO is always well-conditioned. dK too where the weights are spread (ties; the
    # bias's 1e4 range makes every row one-hot again). dQ is ill-conditioned at ties (tested
    # below); where a row is one-hot, dS = P ∘ (dP − rowsum(P ∘ dP)) = 0 and so dQ = dK = 0.
    spread = regime == "ties" and mask != "bias"
    (dq, dk, dv), (dq64, dk64, dv64) = (q.grad, k.grad, v.grad), (t.grad for t in oracle_inputs)
    for grad, oracle in ((dv, dv64), (dk, dk64)) if spread else ((dv, dv64),):
        _assert_close_at_scale(grad, oracle, dtype, max_score)
    if not spread:  # a saturated softmax passes (next to) nothing back to the scores
        tolerance = _tolerance(dtype, max_score)["atol"]
        for grad, oracle in ((dq, dq64), (dk, dk64)):
            assert float(oracle.abs().max()) < 1e-12 and float(grad.abs().max()) < tolerance


def _assert_close_at_scale(
    actual: Tensor, oracle: Tensor, dtype: torch.dtype, max_score: float
) -> None:
    """An output or gradient is a sum of weights times terms of its own size, so the weights'
    rounding (`_tolerance`) scales with the oracle's largest entry. The oracle must be far
    from 0, else any small result would pass."""
    tolerance = _tolerance(dtype, max_score)
    scale = float(oracle.abs().max())
    assert scale > 10 * tolerance["atol"], f"the oracle is ~0 ({scale:.3g}): nothing to compare"
    torch.testing.assert_close(
        actual.double(), oracle, atol=tolerance["atol"] * scale, rtol=tolerance["rtol"]
    )


KNOWN_LOOSE = pytest.mark.xfail(
    reason="the gradient wrt query is ill-conditioned here (see the docstring)",
    raises=AssertionError,  # the comparison fails (~4x the largest gradient); nothing raises
    strict=True,
)


@pytest.mark.parametrize(
    ("kernel", "dtype"),
    [
        ("reference", torch.float32),
        ("reference", torch.bfloat16),
        ("sdpa", torch.float32),
        ("tiled", torch.float32),  # no mask: one fused call, as SDPA
        pytest.param("sdpa", torch.bfloat16, marks=KNOWN_LOOSE),
        pytest.param("tiled", torch.bfloat16, marks=KNOWN_LOOSE),
    ],
    ids=str,
)
def test_query_gradient_at_near_tied_extreme_logits(kernel, dtype):
    """Scores 1e4 ± O(1): the keys share a component of ~3e2, and dQ = scale·Σ_j dS_ij k_j
    cancels it (Σ_j dS_ij = 0 exactly), so dQ keeps only what rounding leaves of that sum,
    amplified 1e2-fold. The reference kernel (one fp32 softmax) and torch's fp32 SDPA keep it
    within 1% of the largest gradient, and so does the tiled kernel with no mask (one fused
    call). Known loose: the tiled kernel when a mask cuts the work into several tiles (each
    tile's log-sum-exp is rounded at |score| 1e4, so the tiles' weights are not consistent to
    the last bit), its bf16 form, and torch's bf16 SDPA backward; their outputs and the
    key/value gradients are fine and every gradient is finite (tested above)."""
    q64, k64, v64 = _extreme("ties", 1.0)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    attention(q, k, v, kernel=kernel).float().square().sum().backward()
    oracle = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention(*oracle, kernel="reference").square().sum().backward()
    scale = float(oracle[0].grad.abs().max())
    torch.testing.assert_close(q.grad.double(), oracle[0].grad, atol=1e-2 * scale, rtol=0)


def _torch_twin(in_proj_weight: Tensor, in_proj_bias: Tensor, out_proj: nn.Linear):
    """torch's nn.MultiheadAttention (16 wide, 2 heads) in float64 with these weights."""
    twin = nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        twin.in_proj_weight.copy_(in_proj_weight)
        twin.in_proj_bias.copy_(in_proj_bias)
        twin.out_proj.load_state_dict(out_proj.state_dict())
    return twin


def _max_score(twin: nn.MultiheadAttention, x: Tensor) -> float:
    """The largest |q · k| / sqrt(head_dim) of self-attention over ``x``, in float64."""
    weight, bias = twin.in_proj_weight.detach(), twin.in_proj_bias.detach()
    q, k = ((x.detach() @ weight[i : i + 16].T + bias[i : i + 16]) for i in (0, 16))
    q, k = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in (q, k))  # (batch, heads, seq, 8)
    return float((q @ k.transpose(-2, -1)).abs().max()) / math.sqrt(8)


def test_extreme_logits_through_the_layer_and_compat():
    """Huge activations through the modules (scores ~1e4 after projection) match torch's
    nn.MultiheadAttention with the same weights in float64, forward and backward."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2)
    drop_in = compat.MultiheadAttention(16, 2, batch_first=True)
    x = (torch.randn(2, 6, 16) * 100.0).requires_grad_()
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)  # torch's polarity: True = hidden
    cases = (
        (layer(x, causal=True), (layer.in_proj.weight, layer.in_proj.bias), layer.out_proj, future),
        (
            drop_in(x, x, x, need_weights=False)[0],
            (drop_in.in_proj_weight, drop_in.in_proj_bias),
            drop_in.out_proj,
            None,
        ),
    )
    for out, in_proj, out_proj, attn_mask in cases:
        twin = _torch_twin(*in_proj, out_proj)
        x64 = x.detach().double().requires_grad_()
        expected = twin(x64, x64, x64, attn_mask=attn_mask, need_weights=False)[0]
        max_score = _max_score(twin, x64)
        assert max_score > EXTREME
        _assert_close_at_scale(out, expected.detach(), torch.float32, max_score)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (grad64,) = torch.autograd.grad(expected.square().sum(), x64)
        _assert_close_at_scale(grad, grad64, torch.float32, max_score)


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows_at_extreme_logits(kernel, dtype):
    """Rows with no visible key give exactly 0 and send no gradient, even beside rows whose
    scores are 1e4 (the basic grid of masks is in test_kernels.py)."""
    q64, k64, v64 = _extreme("ties", 1.0)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    mask = masks.padding([7, 0], max_len=7, q_len=5) & masks.causal(5, 7, align="bottom-right")
    bias = torch.zeros(5, 7).masked_fill(
        torch.tensor([True, False, False, False, True]).view(5, 1), -math.inf
    )
    for kwargs, empty in (
        ({"mask": mask}, (slice(1, 2), slice(None), slice(None))),
        ({"mask": bias.to(dtype)}, (slice(None), slice(None), [0, 4])),
    ):
        out = attention(q, k, v, kernel=kernel, **kwargs)
        assert torch.isfinite(out).all()
        assert (out[empty] == 0).all()
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][empty] == 0).all()


def test_fully_masked_rows_in_the_layer():
    layer = MultiHeadAttention(8, 2)
    x = torch.randn(2, 4, 8, requires_grad=True)
    out = layer(x, mask=masks.padding([4, 0], max_len=4))  # batch 1 sees no key at all
    torch.testing.assert_close(out[1], layer.out_proj.bias.expand(4, 8))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


# -- the training loop's non-finite guard ------------------------------------------------------


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x))).squeeze(-1)


def _trainer(run_dir: Path, poison: dict[int, str], **overrides) -> Trainer:
    """8 batches per epoch; batch i of epoch 0 is poisoned as ``poison[i]`` says:
    "input" (a NaN feature: the loss is NaN) or "grad" (a NaN gradient in head.weight)."""
    torch.manual_seed(0)
    model = Regressor()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, generator=g)

    def batches(epoch: int):
        out = []
        for i in range(8):
            xb = x[i * 8 : (i + 1) * 8].clone()
            if epoch == 0 and poison.get(i) == "input":
                xb[0, 1] = math.nan
            out.append((i, xb, y[i * 8 : (i + 1) * 8]))
        return out

    def loss_fn(batch):
        i, xb, yb = batch
        loss = nn.functional.mse_loss(model(xb), yb)
        if poison.get(i) == "grad" and trainer.epoch == 0:  # this backward only

            def hook(grad: Tensor) -> Tensor:
                handle.remove()
                return torch.full_like(grad, math.nan)

            handle = model.head.weight.register_hook(hook)
        return loss, {}

    settings = dict(run_dir=run_dir, max_steps=12, log_every=1, checkpoint_every=2)
    settings.update(progress_bar=False, plot=False, **overrides)
    trainer = Trainer(model, loss_fn, batches, TrainConfig(**settings))
    return trainer


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stop_on_a_nan_loss_names_the_step_and_keeps_the_weights(tmp_path):
    trainer = _trainer(tmp_path, {5: "input"})
    before = {}
    trainer.after_step = lambda t: before.update(_weights(t.model))
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert "the loss is nan at step 6 (epoch 0, batch 6 of the epoch)" in message
    assert "on_nonfinite='skip'" in message
    assert trainer.step == 5
    after = _weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update was applied
    assert all(torch.isfinite(v).all() for v in after.values())


def test_stop_on_a_nan_gradient_names_the_parameter(tmp_path):
    trainer = _trainer(tmp_path, {2: "grad"}, grad_clip=None)
    with pytest.raises(FloatingPointError, match=r"gradient of head\.weight holds NaN .* step 3"):
        trainer.train()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_skip_drops_the_bad_batches_and_logs_them(tmp_path):
    trainer = _trainer(tmp_path, {1: "input", 4: "grad"}, on_nonfinite="skip")
    result = trainer.train()
    assert result.step == 12 and trainer.skipped == 2
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    records = read_log(tmp_path / "log.jsonl")
    skipped = [r for r in records if r["kind"] == "nonfinite"]
    assert [(r["step"], r["epoch"]) for r in skipped] == [(1, 0), (3, 0)]
    assert "the loss is nan" in skipped[0]["what"]
    assert "gradient of head.weight" in skipped[1]["what"]
    train = [r["step"] for r in records if r["kind"] == "train"]
    assert train == list(range(1, 13))  # each update logged once, the step never repeated
    assert result.epoch == 1  # 14 batches: 12 updates + 2 skipped


def test_skip_gives_up_after_too_many_in_a_row(tmp_path, monkeypatch):
    from multihead.training import loop

    monkeypatch.setattr(loop, "MAX_SKIPS_IN_A_ROW", 3)
    trainer = _trainer(tmp_path, dict.fromkeys(range(8), "input"), on_nonfinite="skip")
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.train()


def test_on_nonfinite_is_validated(tmp_path):
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainConfig(run_dir=tmp_path, max_steps=1, on_nonfinite="ignore")
