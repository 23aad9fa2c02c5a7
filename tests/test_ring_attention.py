"""Ring attention (`multihead.distributed`) against the float64 reference kernel.

One spawn per world size (1, 2 and 4 gloo ranks on a file store): each rank runs every case
on its shard and writes its largest deviations from the single-process reference (computed
on every rank from the same seeded tensors) to a JSON file; the tests read them. Sequence
lengths are odd, so the shards are uneven. Tiles are tiny (4 × 5), so a shard spans many.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

import multihead
from multihead import EncoderLayer, MultiHeadAttention
from multihead.distributed import (
    RingAttention,
    gather_sequence,
    ring_attention,
    shard_intervals,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from multihead.kernels import online_softmax

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# name -> (worlds, seq_len, causal, zigzag, heads, kv_heads, dtype, scale, softcap)
ATTENTION_CASES: dict[str, tuple] = {
    "full_contiguous": ((1, 2, 4), 37, False, False, 4, 4, "float64", None, None),
    "full_zigzag_gqa": ((2, 4), 37, False, True, 4, 2, "float64", None, None),
    "causal_contiguous": ((1, 2, 4), 37, True, False, 4, 4, "float64", None, None),
    "causal_zigzag": ((1, 2, 4), 61, True, True, 4, 4, "float64", None, None),
    "causal_zigzag_gqa_scale": ((2, 4), 29, True, True, 4, 1, "float64", 0.3, None),
    "causal_zigzag_softcap": ((2,), 23, True, True, 2, 2, "float64", None, 2.0),
    "causal_zigzag_fp32": ((2, 4), 45, True, True, 4, 2, "float32", None, None),
    "full_contiguous_fp32": ((2,), 45, False, False, 4, 4, "float32", None, None),
    "causal_zigzag_bf16": ((2,), 45, True, True, 4, 2, "bfloat16", None, None),
}
TOLERANCE = {  # (atol, rtol), as conftest sets them for gradients
    "float64": (1e-10, 1e-8),
    "float32": (3e-5, 3e-5),
    "bfloat16": (3e-2, 2e-2),
}
LAYER_CASES = ("encoder_layer_causal_zigzag", "encoder_layer_full", "rope_attention_zigzag")
ERROR_CASES = ("too_short_for_zigzag", "heads_disagree", "not_a_zigzag_split")


# -- what each rank runs ---------------------------------------------------------------------


def _max_error(actual: Tensor, expected: Tensor) -> list[float]:
    """[largest |difference|, largest |expected|] for a relative tolerance."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return [float((actual - expected).abs().max()), float(expected.abs().max())]


def _attention_case(rank: int, world: int, case: tuple) -> dict[str, list[float]]:
    _, seq_len, causal, zigzag, heads, kv_heads, dtype_name, scale, softcap = case
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seq_len)
    batch, head_dim = 2, 8
    q, k, v = (
        torch.randn(batch, h, seq_len, head_dim, generator=generator, dtype=torch.float64)
        for h in (heads, kv_heads, kv_heads)
    )
    grad_output = torch.randn(batch, heads, seq_len, head_dim, generator=generator)
    # The oracle sees the same (rounded) inputs as the ring.
    full = [t.to(dtype).double().detach().requires_grad_() for t in (q, k, v)]
    expected = multihead.attention(
        *full, causal=causal, scale=scale, softcap=softcap, kernel="reference"
    )
    expected.backward(grad_output.double())

    def shard(x: Tensor) -> Tensor:
        return shard_sequence(x, rank, world, dim=2, zigzag=zigzag)

    local = [shard(t.to(dtype)).detach().requires_grad_() for t in (q, k, v)]
    output = ring_attention(*local, causal=causal, zigzag=zigzag, scale=scale, softcap=softcap)
    assert output.dtype == dtype
    output.backward(shard(grad_output.to(dtype)))
    errors = {"output": _max_error(output, shard(expected))}
    for name, mine, theirs in zip(("d_query", "d_key", "d_value"), local, full, strict=True):
        errors[name] = _max_error(mine.grad, shard(theirs.grad))
    return errors


def _layer_case(rank: int, world: int, name: str) -> dict[str, list[float]]:
    """A Transformer layer (or RoPE attention) on a sharded sequence, against the same
    module on the whole sequence: outputs, input gradients and summed weight gradients."""
    torch.manual_seed(0)
    causal, zigzag = "causal" in name, "zigzag" in name
    if name.startswith("encoder_layer"):
        module: torch.nn.Module = EncoderLayer(16, 4, 32, dropout=0.0, num_kv_heads=2)
    else:
        module = MultiHeadAttention(16, 4, num_kv_heads=2, positions="rope")
        causal = True
    module = module.double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 31, 16, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 31, 16, generator=generator, dtype=torch.float64)

    whole = copy.deepcopy(module)
    x_whole = x.clone().requires_grad_()
    expected = whole(x_whole, causal=causal)
    (expected * weights).sum().backward()

    if isinstance(module, EncoderLayer):
        module.self_attn = RingAttention(module.self_attn, zigzag=zigzag)  # type: ignore[assignment]
    else:
        module = RingAttention(module, zigzag=zigzag)
    x_local = shard_sequence(x, rank, world, zigzag=zigzag).requires_grad_()
    output = module(x_local, causal=causal)
    (output * shard_sequence(weights, rank, world, zigzag=zigzag)).sum().backward()

    errors = {
        "output": _max_error(output, shard_sequence(expected, rank, world, zigzag=zigzag)),
        "d_x": _max_error(x_local.grad, shard_sequence(x_whole.grad, rank, world, zigzag=zigzag)),
        "gathered": _max_error(gather_sequence(output, zigzag=zigzag), expected),
    }
    grads = dict(whole.named_parameters())
    for param_name, param in module.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)  # each rank holds its tokens' share of the weight gradients
        errors[f"d_{param_name}"] = _max_error(
            grad, grads[param_name.replace("attention.", "")].grad
        )
    return errors


def _error_case(rank: int, world: int, name: str) -> str:
    """The message every rank raises (or "no error")."""
    heads = 4 if name != "heads_disagree" or rank == 0 else 2
    lengths = {"too_short_for_zigzag": 1, "heads_disagree": 5, "not_a_zigzag_split": 4 + rank}
    q = torch.randn(1, heads, lengths[name], 8, dtype=torch.float64)
    try:
        ring_attention(q, q, q, causal=True, zigzag=name != "heads_disagree")
    except ValueError as error:
        return str(error)
    return "no error"


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    online_softmax.BLOCK_Q, online_softmax.BLOCK_K = 4, 5
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    results: dict[str, Any] = {}
    for name, case in ATTENTION_CASES.items():
        if world in case[0]:
            results[name] = _attention_case(rank, world, case)
    if world > 1:
        for name in LAYER_CASES:
            results[name] = _layer_case(rank, world, name)
    if world == 2:
        for name in ERROR_CASES:
            results[name] = _error_case(rank, world, name)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory: pytest.TempPathFactory):
    """world -> per-rank results, one spawn per world size (run on first use)."""
    runs: dict[int, list[dict[str, Any]] | BaseException] = {}

    def results(world: int) -> list[dict[str, Any]]:
        if world not in runs:  # a failed spawn is kept too: the other tests then fail fast
            out_dir = tmp_path_factory.mktemp(f"ring{world}")
            try:
                mp.start_processes(
                    _worker,
                    args=(world, str(out_dir / "store"), str(out_dir)),
                    nprocs=world,
                    start_method="spawn",
                )
                runs[world] = [
                    json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)
                ]
            except Exception as error:  # reported by every test that needs it
                runs[world] = error
        run = runs[world]
        if isinstance(run, BaseException):
            raise run
        return run

    return results


def _check(errors: dict[str, list[float]], atol: float, rtol: float, where: str) -> None:
    for name, (error, scale) in errors.items():
        assert error <= atol + rtol * scale, f"{where}: {name} differs by {error:.3g}"


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world", "name"),
    [(w, name) for name, case in ATTENTION_CASES.items() for w in case[0]],
)
def test_ring_attention_matches_reference(ring_results, world: int, name: str) -> None:
    atol, rtol = TOLERANCE[ATTENTION_CASES[name][6]]
    for rank, results in enumerate(ring_results(world)):
        _check(results[name], atol, rtol, f"{name}, rank {rank} of {world}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_on_sharded_sequence_matches_unsharded(ring_results, world: int, name: str):
    for rank, results in enumerate(ring_results(world)):
        errors = results[name]
        assert sum(key.startswith("d_") for key in errors) > 4  # the weights' gradients too
        _check(errors, 1e-10, 1e-8, f"{name}, rank {rank} of {world}")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("too_short_for_zigzag", "cuts it into 4 chunks"),
        ("heads_disagree", "must agree in heads, got [4, 2]"),
        ("not_a_zigzag_split", "shard with multihead.distributed.shard_sequence"),
    ],
)
def test_bad_shards_raise_on_every_rank(ring_results, name: str, expected: str) -> None:
    messages = [results[name] for results in ring_results(2)]
    assert messages[0] == messages[1]  # the same error everywhere: no rank is left waiting
    assert expected in messages[0]


# -- sharding, in one process -----------------------------------------------------------------


@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize(("seq_len", "world"), [(8, 2), (37, 2), (61, 4), (9, 4), (5, 1)])
def test_shards_cover_the_sequence_once(seq_len: int, world: int, zigzag: bool) -> None:
    if zigzag and seq_len < 2 * world:
        pytest.skip("too short for zigzag")
    x = torch.arange(seq_len * 3).view(1, seq_len, 3)
    shards = [shard_sequence(x, r, world, zigzag=zigzag) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, zigzag=zigzag), x)
    positions = torch.cat([shard_positions(seq_len, r, world, zigzag=zigzag) for r in range(world)])
    assert sorted(positions.tolist()) == list(range(seq_len))
    sizes = [s.shape[1] for s in shards]
    assert max(sizes) - min(sizes) <= (2 if zigzag else 1)


def test_zigzag_pairs_an_early_chunk_with_a_late_one() -> None:
    assert shard_intervals(16, 0, 2, zigzag=True) == [(0, 4), (12, 16)]
    assert shard_intervals(16, 1, 2, zigzag=True) == [(4, 8), (8, 12)]
    assert shard_intervals(10, 0, 2, zigzag=False) == [(0, 5)]


def test_shard_errors_name_the_problem() -> None:
    x = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="3 positions but a zigzag layout over 2 ranks"):
        shard_sequence(x, 0, 2, zigzag=True)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match="shard 0 has 3 positions along dim -2, but"):
        unshard_sequence([x, x[:, :1]], zigzag=False)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        shard_sequence([1, 2], 0, 1)  # type: ignore[arg-type]


def test_ring_attention_checks_inputs_before_any_communication() -> None:
    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="must be 4-D"):
        ring_attention(q[0], q, q)
    with pytest.raises(ValueError, match="divide the query's 4"):
        ring_attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="same positions"):
        ring_attention(q, q[:, :, :5], q[:, :, :5])
    with pytest.raises(ValueError, match="scale must be a positive"):
        ring_attention(q, q, q, scale=-1.0)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ring_attention(q, q, q)


def test_ring_attention_module_refuses_what_it_cannot_shard() -> None:
    with pytest.raises(ValueError, match="positions='alibi'"):
        RingAttention(MultiHeadAttention(16, 4, positions="alibi"))
    ring = RingAttention(MultiHeadAttention(16, 4, dropout=0.1))
    x = torch.zeros(1, 5, 16)
    with pytest.raises(ValueError, match="attention dropout"):
        ring(x)
    with pytest.raises(ValueError, match="mask cannot be used"):
        ring.eval()(x, mask=torch.ones(5, 5, dtype=torch.bool))


# -- the benchmark, small --------------------------------------------------------------------


def test_benchmark_quick_writes_the_curve(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # the spawned ranks import the script by name
    for name, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("MALLOC_MMAP_THRESHOLD_", "131072")):
        monkeypatch.setenv(name, value)  # what the script would set, undone after the test
    bench = importlib.import_module("bench_ring")
    try:
        bench.main(["--quick", "--out", str(tmp_path / "ring")])
    finally:
        sys.modules.pop("bench_ring", None)
    payload = json.loads((tmp_path / "ring.json").read_text())
    assert (tmp_path / "ring.png").stat().st_size > 0
    worlds = [row["world"] for row in payload["ring"]]
    assert worlds == list(bench.WORLDS[True])
    for row in payload["ring"]:
        assert row["peak_bytes_per_rank"] > 0 and math.isfinite(row["seconds"])
    assert payload["deviation_vs_one_process"] < 1e-4
