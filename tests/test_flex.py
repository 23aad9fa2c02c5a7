"""The FlexAttention kernel and the kernel choice off the CPU.

Outputs are compared with the float64 reference kernel, on every device present (the CPU
always, CUDA when available; on the CPU Flex has no backward, so only the forward). What
``auto`` picks on CUDA is asked of `select_kernel` with fake CUDA tensors, so the choice is
tested on a machine without a GPU."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import multihead
from multihead import functional, masks, score_mods
from multihead.kernels import flex, online_softmax

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N = 200


@pytest.fixture(autouse=True)
def default_tiles(monkeypatch):
    """The engine's real tile sizes (conftest shrinks them): Flex's blocks are 128."""
    monkeypatch.setattr(online_softmax, "BLOCK_Q", 256)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 128)


def _cases() -> dict[str, dict]:
    lengths = torch.tensor([N, 0, 77])  # batch element 1 sees no key at all
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor([70, 90, 40]))
    return {
        "sliding_window": {"mask": masks.sliding_window(N, window=48)},
        "padding_and_causal": {"mask": masks.padding(lengths, N), "causal": True},
        "documents_and_causal": {"mask": masks.documents(docs) & masks.causal(N)},
        "per_head_mask_mod": {
            "mask": masks.from_function(lambda b, h, q, k: (q - k).abs() <= 8 * (h + 1), N, heads=4)
        },
        "bool_tensor": {
            "mask": torch.rand(3, 1, N, N, generator=torch.Generator().manual_seed(1)) > 0.4
        },  # fmt: skip
        "alibi_causal": {"score_mod": score_mods.alibi(4), "causal": True},
        "float_tensor_softcap": {"mask": torch.randn(1, 4, N, N), "softcap": 4.0},
    }


CASES = _cases()


def _on(device: str, kwargs: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _inputs(device: str, kv_heads: int = 2, grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, N, 32, generator=gen)
    k, v = (torch.randn(3, kv_heads, N, 32, generator=gen) for _ in range(2))
    return tuple(t.to(device).requires_grad_(grad) for t in (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_flex_matches_the_float64_reference(case, device):
    """Output as the reference's; then NaN/inf input makes NaN exactly the rows the
    reference makes NaN (a NaN key: the rows that see it; an inf query: its row)."""
    kwargs = _on(device, CASES[case])
    grad = device != "cpu"
    q, k, v = _inputs(device, grad=grad)
    out = multihead.attention(q, k, v, kernel="flex", **kwargs)
    expected = multihead.attention(
        *(t.detach().double() for t in (q, k, v)), kernel="reference", **kwargs
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    if grad:  # the backward (CUDA) against the reference's
        cotangent = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), cotangent)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        reference = multihead.attention(*leaves, kernel="reference", **kwargs)
        want = torch.autograd.grad(reference, leaves, cotangent.double())
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)

    q, k, v = (t.detach().clone() for t in (q, k, v))
    k[0, 1, 150] = math.nan
    k[2, 0, 3] = math.nan
    q[2, 3, 10, 5] = math.inf
    out = multihead.attention(q, k, v, kernel="flex", **kwargs)
    expected = multihead.attention(q.double(), k.double(), v.double(), kernel="reference", **kwargs)
    assert torch.equal(out.isnan().any(-1).cpu(), expected.isnan().any(-1).cpu())
    assert out.isnan().any(), "the NaN inputs reached no row"
    finite = ~expected.isnan()
    torch.testing.assert_close(out.double()[finite], expected[finite], atol=2e-5, rtol=2e-5)


def test_fully_masked_rows_are_zero():
    q, k, v = _inputs("cpu")
    out = multihead.attention(q, k, v, kernel="flex", **CASES["padding_and_causal"])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_the_block_mask_comes_from_the_mask_and_is_kept_on_it():
    mask = masks.documents(torch.repeat_interleave(torch.arange(3), torch.tensor([300, 50, 250])))
    mask = mask & masks.causal(600)
    made = flex.block_mask(mask, torch.device("cpu"))
    assert flex.block_mask(mask, torch.device("cpu")) is made
    # Flex's view of the blocks: every block it visits (partial or full) and no other is
    # one our structure leaves non-empty, and the full ones are ours.
    structure = mask.block_structure(flex.BLOCK, flex.BLOCK)[0, 0]
    n_q, n_k = structure.shape
    visited = torch.zeros(n_q, n_k, dtype=torch.bool)
    full = torch.zeros(n_q, n_k, dtype=torch.bool)
    for row in range(n_q):
        for j in made.kv_indices[0, 0, row, : made.kv_num_blocks[0, 0, row]].tolist():
            visited[row, j] = True
        for j in made.full_kv_indices[0, 0, row, : made.full_kv_num_blocks[0, 0, row]].tolist():
            full[row, j] = True
    assert torch.equal(full, structure == masks.FULL)
    assert torch.equal(visited, structure == masks.PARTIAL)
    # and the mask it evaluates is ours, pair by pair
    assert torch.equal(made.to_dense()[0, 0].bool(), structure != masks.EMPTY)


def test_flex_refuses_a_backward_on_the_cpu_and_dropout():
    q, k, v = _inputs("cpu", grad=True)
    with pytest.raises(ValueError, match="no FlexAttention backward on the CPU"):
        multihead.attention(q, k, v, kernel="flex", causal=True)
    with torch.no_grad(), pytest.raises(ValueError, match="no dropout"):
        multihead.attention(q, k, v, kernel="flex", causal=True, dropout_p=0.1)


def _chosen(
    device: str, n: int, grad: bool = False, dropout_p: float = 0.0, dense=False, **kwargs
) -> str:
    """The kernel ``auto`` picks for (1, 4, n, 64) inputs on ``device``, without running it
    (``dense``: with a boolean mask tensor)."""
    with FakeTensorMode() if device != "cpu" else contextlib.nullcontext():
        q = torch.empty(1, 4, n, 64, device=device, requires_grad=grad)
        kv = torch.empty(1, 2, n, 64, device=device, requires_grad=grad)
        if dense:
            kwargs["mask"] = torch.ones(n, n, dtype=torch.bool, device=device)
        request = functional._request(
            q, kv, kv, kwargs.get("mask"), kwargs.get("causal", False), None, dropout_p,
            None, False, False, kwargs.get("score_mod"),
        )  # fmt: skip
        return functional.select_kernel(request).NAME


@pytest.mark.parametrize("grad", [False, True])
def test_auto_on_cuda_never_loops_over_tiles(grad):
    """On CUDA a structured mask or a score mod goes to Flex; dense and causal to SDPA;
    what Flex cannot run (dropout) to SDPA or the reference, never the tiled kernel."""
    long = 8192
    window = masks.sliding_window(long, window=256)
    assert _chosen("cuda", long, grad, mask=window) == "flex"
    assert _chosen("cuda", 64, grad, mask=masks.padding([64], 64)) == "flex"
    assert _chosen("cuda", long, grad, causal=True, score_mod=score_mods.alibi(4)) == "flex"
    assert _chosen("cuda", long, grad, causal=True) == "sdpa"
    assert _chosen("cuda", 64, grad) == "sdpa"
    assert _chosen("cuda", 64, grad, dense=True) == "sdpa"
    assert _chosen("cuda", long, grad, dropout_p=0.1, mask=window) == "sdpa"
    mod = score_mods.softcap(5.0)  # not additive: SDPA cannot take it
    assert _chosen("cuda", 512, grad, dropout_p=0.1, score_mod=mod) == "reference"
    # The same calls on the CPU: block skipping and the score mod tile by tile.
    assert _chosen("cpu", long, grad, mask=window) == "tiled"
    assert _chosen("cpu", long, grad, causal=True, score_mod=score_mods.alibi(4)) == "tiled"


def test_explain_says_why_auto_leaves_flex_on_the_cpu():
    q, k, v = _inputs("cpu")
    line = multihead.explain(q, k, v, mask=masks.sliding_window(N, window=48))
    assert "flex not chosen" in line and "compiles" in line and "CPU backward" in line
    assert not line.startswith("flex")
    line = multihead.explain(q, k, v, mask=masks.sliding_window(N, window=48), kernel="flex")
    assert line.startswith("flex: torch FlexAttention") and "sliding_window(48)" in line


class _Windowed(torch.nn.Module):
    def forward(self, q, k, v):
        return multihead.attention(q, k, v, mask=masks.sliding_window(2048, window=64))


def test_inside_torch_compile_auto_runs_flex_where_the_tiled_kernel_would():
    """A long sliding window: eager runs the tiled kernel (it plans on the host), a
    fullgraph-compiled call runs Flex inside the graph; under autograd (no CPU backward
    for Flex) SDPA with the dense mask. Each equals eager."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 2048, 16, generator=gen) for _ in range(3))
    assert multihead.explain(q, k, v, mask=masks.sliding_window(2048, window=64)).startswith(
        "tiled"
    )
    seen: list[str] = []
    functional.OBSERVERS.append(lambda request, chosen, kernel: seen.append(chosen.NAME))
    try:
        compiled = torch.compile(_Windowed(), fullgraph=True, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v), _Windowed()(q, k, v))
        assert seen[0] == "flex", seen
        seen.clear()
        q.requires_grad_()
        out = compiled(q, k, v)
        assert seen[0] == "sdpa", seen
        torch.testing.assert_close(out, _Windowed()(q, k, v))
    finally:
        functional.OBSERVERS.pop()
