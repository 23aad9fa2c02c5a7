"""Scale benchmark: the tiled kernel and the packed / cached paths at long lengths.

One process, two threads, fp32, batch 4, 8 heads, head_dim 64 unless said. Contenders of
each part are timed interleaved round-robin (the order rotates every round), so a noisy
neighbour slows all of them alike, and medians are kept. Six parts:

1. memory: peak RSS growth of one forward + backward, each point in a fresh subprocess
   (VmHWM reset through /proc/self/clear_refs after a small warm-up), for the tiled kernel
   (`multihead.attention(..., kernel="tiled")`), torch SDPA, and the naive formula
   (q@kᵀ, softmax, @v by hand), N in 2048..16384. Where naive would not fit, it is measured
   with batch 1 and 2 heads and scaled by batch·heads (its memory is per (batch, head) slice;
   the scaling is checked at the largest N measured in full). Targets: tiled at N=8192 at
   most 1/8 of naive; tiled growing linearly (increments double when N doubles, not ×4).
2. dense: forward time and throughput of tiled, SDPA and naive without a mask against a
   2048³ fp32 matmul timed in the same rounds (the machine's peak under the same load);
   attention FLOPs = 4·B·H·N²·d. Target: tiled within 1.5× of SDPA at N=4096 (forward and
   forward + backward).
3. sliding window 256 at N=8192: tiled (skips empty tiles) against SDPA with the same dense
   boolean mask. Target: ≥ 8× faster forward (forward + backward reported too).
4. causal at N=4096: tiled with block skipping against the same kernel with skipping turned
   off (every tile visited, the mask applied in each), and against the tiled kernel given the
   causal mask as a dense bool tensor. Target: ≥ 1.7× forward.
5. ragged batch: 16 sequences, lengths uniform in 64..1024 (seed 0), d_model 512:
   `MultiHeadAttention(cu_seqlens=...)` against `torch.nn.MultiheadAttention` with
   key_padding_mask on the padded batch, same weights, outputs checked on the real tokens;
   and the cores alone (`attention_varlen` against SDPA with the padding mask).
   Target: the layer ≥ 2× faster (inference and training).
6. decoding 8192 tokens one at a time with `MultiHeadAttention` (d_model 256, 4 heads, batch 1)
   and a `SlidingWindowKVCache` of 512, against a full `KVCache`, stepped alternately: time
   per token and cache memory at every 512 tokens. Target: both flat after the window fills.

    .venv/bin/python benchmarks/bench_scale.py            # full run (~15 min on a busy machine)
    .venv/bin/python benchmarks/bench_scale.py --quick    # smoke test, small sizes
    .venv/bin/python benchmarks/bench_scale.py --parts memory causal

Writes ``results/scale.json`` and ``results/scale.png`` (``scale_quick.*`` with --quick).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import cpu_model, interleave, load_average, paired_ratio, proc_status
from torch import Tensor, nn

import multihead
from multihead import MultiHeadAttention, masks
from multihead.cache import KVCache, SlidingWindowKVCache
from multihead.kernels import online_softmax

THREADS = 2
BATCH = 4
HEADS = 8
HEAD_DIM = 64
RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("memory", "dense", "sliding", "causal", "ragged", "decode")
MAX_MEMORY_GB = 14.0
NAIVE_N2_BUFFERS = 3.5  # naive forward + backward peak ≈ 3.2 B·H·N² fp32 buffers (measured)

# Sizes per part: (full, quick).
SIZES = {
    "memory": ((2048, 4096, 8192, 16384), (256, 512, 1024, 2048)),
    "dense": ((1024, 2048, 4096), (256, 512)),
    "dense_train": (4096, 512),
    "sliding": ((8192, 256), (2048, 256)),
    "causal": (4096, 1024),
    "ragged": ((16, 64, 1024, 512, 8), (4, 64, 256, 128, 4)),  # seqs, min, max, d_model, heads
    "decode": ((8192, 512, 256, 4), (1024, 128, 64, 2)),  # tokens, window, d_model, heads
    # attention_varlen's two paths: (sequences, min, max length) with means 8 / 16 / 32 / 64.
    "ragged_paths": (
        ((512, 4, 12), (256, 8, 24), (128, 16, 48), (64, 32, 96)),
        ((64, 4, 12), (32, 16, 48)),
    ),
}
MATMUL = (2048, 1024)
SLOW_STEP_S = 5.0  # a step slower than this is repeated only twice (keeps the full run short)
TIMING = {  # target seconds per contender, min and max repeats
    False: (3.0, 3, 10),
    True: (0.2, 2, 3),
}
TARGETS = {
    "memory_tiled_over_naive_8192": 1 / 8,
    "dense_tiled_over_sdpa_4096": 1.5,
    "sliding_speedup": 8.0,
    "causal_skip_speedup": 1.7,
    "ragged_layer_speedup": 2.0,
}


# -- timing ------------------------------------------------------------------------------------


def round_robin(
    steps: dict[str, Callable[[], float]], quick: bool, warmup: int = 1
) -> dict[str, list[tuple[int, float]]]:
    """Warm each step up, then call them round-robin, starting one later each round.

    A step returns its own wall time. The number of repeats per contender follows its
    warm-up time (TIMING); one with fewer repeats than there are rounds has its calls
    spread evenly over them, so all share the same stretch of time.
    """
    target_s, min_repeats, max_repeats = TIMING[quick]
    repeats = {}
    for key, step in steps.items():
        elapsed = [step() for _ in range(warmup)][-1]
        fewest = min_repeats if elapsed < SLOW_STEP_S else min(min_repeats, 2)
        repeats[key] = max(fewest, min(max_repeats, math.ceil(target_s / elapsed)))
    by_round = {key: (lambda index, step=step: step()) for key, step in steps.items()}
    return interleave(by_round, max(repeats.values()), repeats)


def median(times: list[tuple[int, float]]) -> float:
    return statistics.median(t for _, t in times)


def mode_steps(
    runs: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]], mode: str, n: int
) -> dict[str, Callable[[], float]]:
    """Timed steps for ``runs`` on fresh (q, k, v) of length n: forward, or "train"."""
    q, k, v = qkv(n, grad=mode == "train")
    if mode == "train":
        return {
            key: train_step(lambda run=run: run(q, k, v), [q, k, v]) for key, run in runs.items()
        }
    return {key: forward_step(lambda run=run: run(q, k, v)) for key, run in runs.items()}


def summarise(times: dict[str, list[tuple[int, float]]]) -> dict[str, dict[str, Any]]:
    return {
        key: {
            "median_s": median(values),
            "min_s": min(t for _, t in values),
            "repeats": len(values),
            "times_s": [round(t, 6) for _, t in values],
            "rounds": [r for r, _ in values],
        }
        for key, values in times.items()
    }


def forward_step(run: Callable[[], Tensor]) -> Callable[[], float]:
    def step() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            out = run()
            elapsed = time.perf_counter() - start
        del out
        return elapsed

    return step


def train_step(run: Callable[[], Tensor], leaves: list[Tensor]) -> Callable[[], float]:
    """Forward + backward of ``output.sum()``; gradients on ``leaves`` are cleared first."""

    def step() -> float:
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        run().sum().backward()
        return time.perf_counter() - start

    return step


# -- machine -----------------------------------------------------------------------------------


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def qkv(n: int, batch: int = BATCH, heads: int = HEADS, grad: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, n, HEAD_DIM, generator=generator).requires_grad_(grad)
        for _ in range(3)
    )


def naive(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The formula by hand: the (N × N) score matrix and its softmax in memory."""
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def tiled_dense(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return multihead.attention(q, k, v, kernel="tiled")


MEMORY_CONTENDERS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "tiled": tiled_dense,
    "sdpa": F.scaled_dot_product_attention,
    "naive": naive,
}


# -- 1. memory ---------------------------------------------------------------------------------


def memory_point(kind: str, n: int, batch: int, heads: int) -> dict[str, Any]:
    """Run in a fresh process: peak RSS growth of one forward + backward at size n."""
    torch.set_num_threads(THREADS)
    run = MEMORY_CONTENDERS[kind]
    q, k, v = qkv(128, batch, heads, grad=True)
    run(q, k, v).sum().backward()  # one-time allocations (thread pools, kernels) come first
    del q, k, v
    q, k, v = qkv(n, batch, heads, grad=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = proc_status("VmRSS")
    if proc_status("VmHWM") > base + (1 << 20):
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    start = time.perf_counter()
    run(q, k, v).sum().backward()
    elapsed = time.perf_counter() - start
    peak = proc_status("VmHWM") - base
    return {
        "kind": kind,
        "n": n,
        "batch": batch,
        "heads": heads,
        "peak_bytes": peak,
        "seconds": elapsed,
    }


def measure_memory(kind: str, n: int, batch: int, heads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-point", kind, str(n), str(batch), str(heads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory point {kind} N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def naive_estimate_bytes(n: int, batch: int = BATCH, heads: int = HEADS) -> float:
    return NAIVE_N2_BUFFERS * batch * heads * n * n * 4 + 0.3e9


def part_memory(quick: bool) -> dict[str, Any]:
    sizes = SIZES["memory"][quick]
    budget = min(MAX_MEMORY_GB * 1e9, mem_available() - 1.5e9)
    points: list[dict[str, Any]] = []
    largest_full_naive = None
    for n in sizes:
        for kind in ("tiled", "sdpa", "naive"):
            if kind == "naive" and naive_estimate_bytes(n) > budget:
                point = measure_memory(kind, n, 1, 2)
                point["scaled_from"] = {"batch": 1, "heads": 2, "peak_bytes": point["peak_bytes"]}
                point["peak_bytes"] = point["peak_bytes"] * BATCH * HEADS // 2
                point["batch"], point["heads"] = BATCH, HEADS
            else:
                point = measure_memory(kind, n, BATCH, HEADS)
                if kind == "naive":
                    largest_full_naive = n
            points.append(point)
            scaled = " (scaled from batch 1, 2 heads)" if "scaled_from" in point else ""
            print(
                f"memory N={n:6d} {kind:6s} peak +{point['peak_bytes'] / 1e6:9.1f} MB "
                f"in {point['seconds']:.1f} s{scaled}",
                flush=True,
            )
    check = None
    if largest_full_naive is not None:  # the scaling, checked where both can be measured
        small = measure_memory("naive", largest_full_naive, 1, 2)
        full = next(p for p in points if p["kind"] == "naive" and p["n"] == largest_full_naive)
        scaled = small["peak_bytes"] * BATCH * HEADS / 2
        check = {
            "n": largest_full_naive,
            "measured": full["peak_bytes"],
            "scaled": scaled,
            "scaled_over_measured": scaled / full["peak_bytes"],
        }
        print(
            f"memory naive scaling check at N={largest_full_naive}: scaled/measured "
            f"{check['scaled_over_measured']:.3f}"
        )

    def peak(kind: str, n: int) -> float:
        return next(p["peak_bytes"] for p in points if p["kind"] == kind and p["n"] == n)

    tiled_peaks = [peak("tiled", n) for n in sizes]
    slope, intercept = linear_fit(list(sizes), tiled_peaks)
    residual = max(
        abs(p - (intercept + slope * n)) / p for n, p in zip(sizes, tiled_peaks, strict=True)
    )
    increments = [b - a for a, b in zip(tiled_peaks, tiled_peaks[1:], strict=False)]
    increment_ratios = [b / a for a, b in zip(increments, increments[1:], strict=False) if a > 0]
    at = 8192 if 8192 in sizes else sizes[-2]
    ratio = peak("tiled", at) / peak("naive", at)
    return {
        "sizes": list(sizes),
        "points": points,
        "naive_scaling_check": check,
        "tiled_linear_fit": {
            "bytes_per_token": slope,
            "intercept_bytes": intercept,
            "max_relative_residual": residual,
            "increment_ratios": increment_ratios,
            "note": "N doubles each step: increments double (ratio 2) if linear, x4 if quadratic",
        },
        "tiled_over_naive": {"n": at, "ratio": ratio},
        "sdpa_over_tiled": {n: peak("sdpa", n) / peak("tiled", n) for n in sizes},
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return slope, mean_y - slope * mean_x


# -- 2. dense: throughput against the matmul peak ------------------------------------------------


def matmul_step(size: int) -> Callable[[], float]:
    a, b = torch.randn(size, size), torch.randn(size, size)

    def step() -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - start

    return step


def part_dense(quick: bool) -> dict[str, Any]:
    matmul = MATMUL[quick]
    rows = []
    for n in SIZES["dense"][quick]:
        q, k, v = qkv(n)
        steps = {"matmul": matmul_step(matmul)}
        steps["tiled"] = forward_step(lambda q=q, k=k, v=v: tiled_dense(q, k, v))
        steps["sdpa"] = forward_step(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        if naive_estimate_bytes(n) / 2 < MAX_MEMORY_GB * 1e9:
            steps["naive"] = forward_step(lambda q=q, k=k, v=v: naive(q, k, v))
        stats = summarise(round_robin(steps, quick))
        peak = 2 * matmul**3 / stats["matmul"]["median_s"]
        flops = 4 * BATCH * HEADS * n * n * HEAD_DIM
        row: dict[str, Any] = {"n": n, "matmul_gflops": peak / 1e9, "times": stats}
        for key in steps:
            if key != "matmul":
                rate = flops / stats[key]["median_s"]
                row[f"{key}_gflops"] = rate / 1e9
                row[f"{key}_fraction_of_peak"] = rate / peak
        row["tiled_over_sdpa"] = stats["tiled"]["median_s"] / stats["sdpa"]["median_s"]
        rows.append(row)
        print(
            f"dense N={n:5d} forward: matmul {peak / 1e9:6.1f} GFLOP/s; "
            + ", ".join(
                f"{key} {row[f'{key}_gflops']:6.1f} ({row[f'{key}_fraction_of_peak']:.0%})"
                for key in steps
                if key != "matmul"
            )
            + f"; tiled/sdpa {row['tiled_over_sdpa']:.2f}",
            flush=True,
        )
        del q, k, v

    n = SIZES["dense_train"][quick]
    q, k, v = qkv(n, grad=True)
    steps = {
        "tiled": train_step(lambda: tiled_dense(q, k, v), [q, k, v]),
        "sdpa": train_step(lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v]),
    }
    times = round_robin(steps, quick)
    train = {
        "n": n,
        "times": summarise(times),
        "tiled_over_sdpa": median(times["tiled"]) / median(times["sdpa"]),
        "tiled_over_sdpa_paired": paired_ratio(times["tiled"], times["sdpa"]),
    }
    print(f"dense N={n:5d} forward+backward: tiled/sdpa {train['tiled_over_sdpa']:.2f}", flush=True)
    forward_at = next(r for r in rows if r["n"] == n) if any(r["n"] == n for r in rows) else None
    return {
        "matmul_size": matmul,
        "flops": "4·B·H·N²·d (forward, no mask)",
        "forward": rows,
        "train": train,
        "tiled_over_sdpa_forward": forward_at["tiled_over_sdpa"] if forward_at else None,
        "deviation": max_deviation(
            [tiled_dense, F.scaled_dot_product_attention, naive], *qkv(256, seed=1)
        ),
    }


def max_deviation(runs: list[Callable[..., Tensor]], *args: Tensor, **kwargs: Any) -> float:
    """Largest |difference| between the outputs of ``runs`` and the first one."""
    with torch.inference_mode():
        outs = [run(*args, **kwargs) for run in runs]
    return max(float((out - outs[0]).abs().max()) for out in outs)


# -- 3. sliding window -------------------------------------------------------------------------


def part_sliding(quick: bool) -> dict[str, Any]:
    n, window = SIZES["sliding"][quick]
    mask = masks.sliding_window(n, window=window)
    dense = mask.to_dense()  # (1, 1, N, N) bool, True = may attend

    def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return multihead.attention(q, k, v, mask=mask, kernel="tiled")

    def theirs(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    result: dict[str, Any] = {"n": n, "window": window}
    q, k, v = qkv(n)
    result["explain"] = multihead.explain(q, k, v, mask=mask, kernel="tiled")
    check = min(n, 2048)  # the outputs agree (checked at a length where SDPA is quick)
    small, small_dense = masks.sliding_window(check, window=window), dense[..., :check, :check]
    with torch.inference_mode():
        q, k, v = qkv(check)
        mine = multihead.attention(q, k, v, mask=small, kernel="tiled")
        torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=small_dense)
    result["deviation"] = {"n": check, "max_abs": float((mine - torch_out).abs().max())}
    runs = {"tiled": ours, "sdpa_dense_mask": theirs}
    for mode in ("forward", "train"):
        steps = mode_steps(runs, mode, n)
        times = round_robin(steps, quick)
        result[mode] = {
            "times": summarise(times),
            "speedup": median(times["sdpa_dense_mask"]) / median(times["tiled"]),
            "speedup_paired": 1 / paired_ratio(times["tiled"], times["sdpa_dense_mask"]),
        }
        print(
            f"sliding N={n} w={window} {mode:7s}: tiled {median(times['tiled']) * 1e3:8.1f} ms, "
            f"sdpa+mask {median(times['sdpa_dense_mask']) * 1e3:8.1f} ms, "
            f"speedup {result[mode]['speedup']:.1f}x",
            flush=True,
        )
    return result


# -- 4. causal block skipping ------------------------------------------------------------------


@contextlib.contextmanager
def no_skipping() -> Iterator[None]:
    """The tiled kernel visits every tile (the mask still applied in each)."""
    original = masks.Mask.tiles

    def every_tile_cut(self: masks.Mask, block_q: int, block_k: int) -> Tensor:
        shape = (-(-self.q_len // block_q), -(-self.k_len // block_k))
        return torch.full(shape, masks.PARTIAL, dtype=torch.int8)

    masks.Mask.tiles = every_tile_cut  # type: ignore[method-assign]
    try:
        yield
    finally:
        masks.Mask.tiles = original  # type: ignore[method-assign]


def part_causal(quick: bool) -> dict[str, Any]:
    n = SIZES["causal"][quick]
    mask = masks.causal(n)
    dense = mask.to_dense()

    def skipping(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return multihead.attention(q, k, v, mask=mask, kernel="tiled")

    def visiting_all(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with no_skipping():  # a mask of its own: the shared one keeps the skipping plan
            return multihead.attention(q, k, v, mask=masks.causal(n), kernel="tiled")

    def dense_bias(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return multihead.attention(q, k, v, mask=dense, kernel="tiled")

    def sdpa_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    runs = {
        "skipping": skipping,
        "no_skipping": visiting_all,
        "dense_bool_bias": dense_bias,
        "sdpa_is_causal": sdpa_causal,
    }
    result: dict[str, Any] = {"n": n}
    q, k, v = qkv(n)
    result["deviation"] = max_deviation(list(runs.values()), q, k, v)
    for mode in ("forward", "train"):
        steps = mode_steps(runs, mode, n)
        if mode == "train":  # the backward pass plans again: patch around both
            inner = steps["no_skipping"]

            def unskipped(inner: Callable[[], float] = inner) -> float:
                with no_skipping():
                    return inner()

            steps["no_skipping"] = unskipped
        times = round_robin(steps, quick)
        result[mode] = {
            "times": summarise(times),
            "speedup_vs_no_skipping": median(times["no_skipping"]) / median(times["skipping"]),
            "speedup_vs_no_skipping_paired": 1
            / paired_ratio(times["skipping"], times["no_skipping"]),
            "speedup_vs_dense_bias": median(times["dense_bool_bias"]) / median(times["skipping"]),
            "skipping_over_sdpa": median(times["skipping"]) / median(times["sdpa_is_causal"]),
        }
        print(
            f"causal N={n} {mode:7s}: "
            + ", ".join(f"{key} {median(t) * 1e3:8.1f} ms" for key, t in times.items())
            + f"; skipping speedup {result[mode]['speedup_vs_no_skipping']:.2f}x "
            f"(vs dense bias {result[mode]['speedup_vs_dense_bias']:.2f}x)",
            flush=True,
        )
    return result


# -- 5. ragged batch ---------------------------------------------------------------------------


def ragged_layers(d_model: int, heads: int) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    ours = MultiHeadAttention(d_model, heads)
    theirs = nn.MultiheadAttention(d_model, heads, batch_first=True)
    with torch.no_grad():
        ours.in_proj.bias.normal_(std=0.02)
        ours.out_proj.bias.normal_(std=0.02)
        theirs.in_proj_weight.copy_(ours.in_proj.weight)
        theirs.in_proj_bias.copy_(ours.in_proj.bias)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, theirs


def part_ragged(quick: bool) -> dict[str, Any]:
    count, low, high, d_model, heads = SIZES["ragged"][quick]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(low, high + 1, (count,), generator=generator)
    longest = int(lengths.max())
    valid = torch.arange(longest) < lengths.unsqueeze(1)  # (B, L) True = real token
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    x = torch.randn(count, longest, d_model, generator=generator) * valid.unsqueeze(-1)
    packed = x[valid]
    ours, theirs = ragged_layers(d_model, heads)
    layer = {
        "ours_packed": lambda x, packed: ours(packed, cu_seqlens=cu),
        "torch_padded": lambda x, packed: theirs(
            x, x, x, key_padding_mask=~valid, need_weights=False
        )[0],
    }

    # The cores alone: packed (total, H, d) against the padded (B, H, L, d) with a key mask.
    head_dim = d_model // heads
    qkv_packed = [
        torch.randn(packed.shape[0], heads, head_dim, generator=generator) for _ in range(3)
    ]
    qkv_padded = [multihead.unpack(t, cu, longest).transpose(1, 2) for t in qkv_packed]
    key_mask = valid.view(count, 1, 1, longest)
    core = {
        "attention_varlen": lambda qs: multihead.attention_varlen(*qs, cu, cu),
        "sdpa_padded": lambda qs: F.scaled_dot_product_attention(*qs, attn_mask=key_mask),
    }

    with torch.inference_mode():
        ours.eval()
        theirs.eval()
        mine = layer["ours_packed"](x, packed)
        torch_out = layer["torch_padded"](x, packed)[valid]
        layer_deviation = float((mine - torch_out).abs().max())
        core_packed = core["attention_varlen"](qkv_packed)
        core_padded = core["sdpa_padded"](qkv_padded).transpose(1, 2)[valid]
        core_deviation = float((core_packed - core_padded).abs().max())
    if layer_deviation > 1e-4 or core_deviation > 1e-4:
        raise RuntimeError(f"ragged outputs disagree: {layer_deviation:.2e}, {core_deviation:.2e}")

    result: dict[str, Any] = {
        "lengths": lengths.tolist(),
        "total_tokens": int(lengths.sum()),
        "padded_tokens": count * longest,
        "d_model": d_model,
        "heads": heads,
        "layer_deviation": layer_deviation,
        "core_deviation": core_deviation,
    }
    x_train = x.clone().requires_grad_()
    packed_train = packed.clone().requires_grad_()
    params = list(ours.parameters()) + list(theirs.parameters())
    for mode in ("inference", "training"):
        ours.train(mode == "training")
        theirs.train(mode == "training")
        if mode == "inference":
            steps = {
                key: forward_step(lambda run=run: run(x, packed)) for key, run in layer.items()
            }
            steps.update(
                {
                    "core_varlen": forward_step(lambda: core["attention_varlen"](qkv_packed)),
                    "core_sdpa_padded": forward_step(lambda: core["sdpa_padded"](qkv_padded)),
                }
            )
        else:
            leaves = [x_train, packed_train, *params]
            steps = {
                key: train_step(lambda run=run: run(x_train, packed_train), leaves)
                for key, run in layer.items()
            }
        times = round_robin(steps, quick)
        row = {
            "times": summarise(times),
            "layer_speedup": median(times["torch_padded"]) / median(times["ours_packed"]),
            "layer_speedup_paired": 1 / paired_ratio(times["ours_packed"], times["torch_padded"]),
        }
        if "core_varlen" in times:
            row["core_speedup"] = median(times["core_sdpa_padded"]) / median(times["core_varlen"])
        result[mode] = row
        core_text = f", core {row['core_speedup']:.2f}x" if "core_speedup" in row else ""
        print(
            f"ragged {mode:9s}: ours packed {median(times['ours_packed']) * 1e3:7.1f} ms, "
            f"torch padded {median(times['torch_padded']) * 1e3:7.1f} ms, "
            f"layer speedup {row['layer_speedup']:.2f}x{core_text}",
            flush=True,
        )
    result["paths"] = part_ragged_paths(quick)
    return result


def part_ragged_paths(quick: bool) -> list[dict[str, Any]]:
    """attention_varlen's call per sequence against one tiled call over the pack, by the
    mean sequence length: where the first starts to win sets PER_SEQUENCE_MIN_MEAN."""
    from multihead import varlen

    rows = []
    generator = torch.Generator().manual_seed(1)
    for count, low, high in SIZES["ragged_paths"][quick]:
        lengths = torch.randint(low, high + 1, (count,), generator=generator)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        shape = (int(lengths.sum()), HEADS, HEAD_DIM)
        q, k, v = (torch.randn(shape, generator=generator).requires_grad_() for _ in range(3))

        def run(threshold: int, q: Tensor = q, k: Tensor = k, v: Tensor = v, cu=cu) -> Tensor:
            saved, varlen.PER_SEQUENCE_MIN_MEAN = varlen.PER_SEQUENCE_MIN_MEAN, threshold
            try:
                return multihead.attention_varlen(q, k, v, cu, cu, causal=True)
            finally:
                varlen.PER_SEQUENCE_MIN_MEAN = saved

        row: dict[str, Any] = {"sequences": count, "mean_length": float(lengths.float().mean())}
        for mode in ("forward", "train"):
            paths = {"per_sequence": lambda run=run: run(0), "packed": lambda run=run: run(1 << 62)}
            if mode == "train":
                steps = {key: train_step(path, [q, k, v]) for key, path in paths.items()}
            else:
                steps = {key: forward_step(path) for key, path in paths.items()}
            times = round_robin(steps, quick)
            row[mode] = {
                "times": summarise(times),
                "packed_over_per_sequence": paired_ratio(times["packed"], times["per_sequence"]),
            }
        rows.append(row)
        print(
            f"ragged paths, {count} causal sequences of mean {row['mean_length']:.0f}: "
            f"packed / per sequence {row['forward']['packed_over_per_sequence']:.2f} forward, "
            f"{row['train']['packed_over_per_sequence']:.2f} forward+backward",
            flush=True,
        )
    return rows


# -- 6. decoding with a sliding-window cache ---------------------------------------------------


def cache_bytes(cache: KVCache | SlidingWindowKVCache) -> dict[str, int]:
    """Allocated bytes of the buffers, and the bytes of the positions they hold."""
    allocated = cache.keys.nbytes + cache.values.nbytes
    per_position = allocated // cache.keys.shape[2]
    return {"allocated": allocated, "held": per_position * cache.length}


def part_decode(quick: bool) -> dict[str, Any]:
    tokens, window, d_model, heads = SIZES["decode"][quick]
    torch.manual_seed(0)
    layer = MultiHeadAttention(d_model, heads).eval()
    head_dim = d_model // heads
    caches = {
        "sliding_window": SlidingWindowKVCache(1, heads, window, head_dim),
        "full_kv_cache": KVCache(1, heads, tokens, head_dim),
    }
    inputs = torch.randn(tokens, 1, 1, d_model, generator=torch.Generator().manual_seed(0))
    per_token: dict[str, list[float]] = {key: [] for key in caches}
    checkpoints: list[dict[str, Any]] = []
    explains = {}
    with torch.inference_mode():
        for step in range(tokens):
            # Alternate which cache goes first, so both see the same machine.
            order = list(caches) if step % 2 == 0 else list(caches)[::-1]
            for key in order:
                start = time.perf_counter()
                layer(inputs[step], cache=caches[key], causal=True)
                per_token[key].append(time.perf_counter() - start)
            if (step + 1) % window == 0:
                row: dict[str, Any] = {"tokens": step + 1, "rss_bytes": proc_status("VmRSS")}
                for key, cache in caches.items():
                    recent = per_token[key][-window:]
                    row[key] = {
                        "median_ms_per_token": statistics.median(recent) * 1e3,
                        **cache_bytes(cache),
                    }
                checkpoints.append(row)
                print(
                    f"decode {step + 1:5d} tokens: "
                    + ", ".join(
                        f"{key} {row[key]['median_ms_per_token']:.3f} ms/token, "
                        f"{row[key]['held'] / 1e6:.2f} MB held"
                        for key in caches
                    )
                    + f", RSS {row['rss_bytes'] / 1e6:.0f} MB",
                    flush=True,
                )
        k_now = caches["sliding_window"].length
        q = torch.zeros(1, heads, 1, head_dim)
        k = torch.zeros(1, heads, k_now, head_dim)
        explains["sliding_window"] = multihead.explain(
            q, k, k, mask=masks.sliding_window(1, k_now, window=window, align="bottom-right")
        )
    after = [row for row in checkpoints if row["tokens"] > window]
    flat: dict[str, Any] = {}
    for key in caches:
        times = [row[key]["median_ms_per_token"] for row in after]
        held = [row[key]["held"] for row in after]
        flat[key] = {
            "fitted_growth": fitted_growth(checkpoints, key, window),
            "last_over_first_time": times[-1] / times[0] if times else None,
            "max_over_min_time": max(times) / min(times) if times else None,
            "held_bytes_first_last": [held[0], held[-1]] if held else None,
        }
    rss = [row["rss_bytes"] for row in after]
    return {
        "tokens": tokens,
        "window": window,
        "d_model": d_model,
        "heads": heads,
        "batch": 1,
        "checkpoints": checkpoints,
        "after_window": flat,
        "rss_growth_after_window_bytes": rss[-1] - rss[0] if rss else None,
        "explain": explains,
    }


def fitted_growth(checkpoints: list[dict[str, Any]], key: str, window: int) -> float | None:
    """Relative growth of the time per token after the window fills, from a straight-line
    fit: slope × (last − first position) / mean. The load of a shared machine moves single
    checkpoints up and down; a cost that grows with position shows as a slope."""
    rows = [row for row in checkpoints if row["tokens"] > window]
    if len(rows) < 2:
        return None
    xs = [float(row["tokens"]) for row in rows]
    ys = [row[key]["median_ms_per_token"] for row in rows]
    slope, _ = linear_fit(xs, ys)
    return slope * (xs[-1] - xs[0]) / statistics.fmean(ys)


# -- targets -----------------------------------------------------------------------------------


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, target: float, higher_is_better: bool, what: str):
        met = None
        if measured is not None:
            met = measured >= target if higher_is_better else measured <= target
        rows.append(
            {
                "target": name,
                "what": what,
                "measured": measured,
                "goal": target,
                "higher_is_better": higher_is_better,
                "met": met,
            }
        )

    if "memory" in parts:
        memory = parts["memory"]
        ratio = memory["tiled_over_naive"]
        add(
            "memory_tiled_over_naive",
            ratio["ratio"],
            TARGETS["memory_tiled_over_naive_8192"],
            False,
            f"tiled / naive forward+backward peak at N={ratio['n']}",
        )
        ratios = memory["tiled_linear_fit"]["increment_ratios"]
        add(
            "memory_tiled_linear",
            max(ratios) if ratios else None,
            2.5,
            False,
            "largest ratio of successive peak increments as N doubles (2 linear, 4 quadratic)",
        )
    if "dense" in parts:
        dense = parts["dense"]
        n = dense["train"]["n"]
        if dense["tiled_over_sdpa_forward"] is not None:
            add(
                "dense_tiled_over_sdpa_forward",
                dense["tiled_over_sdpa_forward"],
                TARGETS["dense_tiled_over_sdpa_4096"],
                False,
                f"tiled / SDPA forward time, no mask, N={n}",
            )
        add(
            "dense_tiled_over_sdpa_train",
            dense["train"]["tiled_over_sdpa"],
            TARGETS["dense_tiled_over_sdpa_4096"],
            False,
            f"tiled / SDPA forward+backward time, no mask, N={n}",
        )
    if "sliding" in parts:
        sliding = parts["sliding"]
        add(
            "sliding_forward_speedup",
            sliding["forward"]["speedup"],
            TARGETS["sliding_speedup"],
            True,
            f"SDPA dense mask / tiled, window {sliding['window']}, N={sliding['n']}",
        )
        add(
            "sliding_train_speedup",
            sliding["train"]["speedup"],
            TARGETS["sliding_speedup"],
            True,
            "the same, forward+backward (reported; the target is for the forward)",
        )
    if "causal" in parts:
        causal = parts["causal"]
        add(
            "causal_skip_speedup",
            causal["forward"]["speedup_vs_no_skipping"],
            TARGETS["causal_skip_speedup"],
            True,
            f"tiled without / with block skipping, causal forward, N={causal['n']}",
        )
    if "ragged" in parts:
        ragged = parts["ragged"]
        for mode in ("inference", "training"):
            add(
                f"ragged_layer_speedup_{mode}",
                ragged[mode]["layer_speedup"],
                TARGETS["ragged_layer_speedup"],
                True,
                f"torch MHA padded / MultiHeadAttention packed, {mode}",
            )
    if "decode" in parts:
        window = parts["decode"]["window"]
        checkpoints = parts["decode"]["checkpoints"]
        full = fitted_growth(checkpoints, "full_kv_cache", window)
        add(
            "decode_time_flat",
            fitted_growth(checkpoints, "sliding_window", window),
            0.25,
            False,
            "sliding-window decoding: fitted relative growth of the time per token from the "
            f"window filling to the end (the full KVCache: {full:.2f})"
            if full is not None
            else "sliding-window decoding: fitted relative growth of the time per token",
        )
        decode = parts["decode"]["after_window"]["sliding_window"]
        held = decode["held_bytes_first_last"]
        add(
            "decode_memory_flat",
            held[1] / held[0] if held else None,
            1.0,
            False,
            "sliding-window cache bytes held, last / first checkpoint after the window fills",
        )
    return rows


# -- plot --------------------------------------------------------------------------------------


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts, meta = payload["parts"], payload["meta"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    ax_mem, ax_dense, ax_speed, ax_dec_time, ax_dec_mem, ax_targets = axes.flat

    if "memory" in parts:
        memory = parts["memory"]
        for kind, style in (("tiled", "o-"), ("sdpa", "s-"), ("naive", "^-")):
            points = [p for p in memory["points"] if p["kind"] == kind]
            ns = [p["n"] for p in points]
            ax_mem.plot(ns, [p["peak_bytes"] / 1e9 for p in points], style, label=kind)
            for p in points:
                if "scaled_from" in p:
                    ax_mem.annotate("scaled", (p["n"], p["peak_bytes"] / 1e9), fontsize=7)
        ax_mem.set_xscale("log", base=2)
        ax_mem.set_yscale("log")
        ax_mem.set_xlabel("sequence length N")
        ax_mem.set_ylabel("peak RSS growth, forward+backward (GB)")
        ax_mem.set_title("memory (naive 'scaled': batch 1, 2 heads × 16)")
        ax_mem.legend(fontsize=8)
        ax_mem.grid(True, which="both", alpha=0.3)

    if "dense" in parts:
        rows = parts["dense"]["forward"]
        for key in ("tiled", "sdpa", "naive"):
            points = [
                (r["n"], r[f"{key}_fraction_of_peak"])
                for r in rows
                if f"{key}_fraction_of_peak" in r
            ]
            if points:
                ns, fractions = zip(*points, strict=True)
                ax_dense.plot(ns, [100 * f for f in fractions], "o-", label=key)
        ax_dense.set_xscale("log", base=2)
        ax_dense.set_xlabel("sequence length N")
        ax_dense.set_ylabel("% of the measured fp32 matmul GFLOP/s")
        ax_dense.set_title(f"forward throughput, no mask (matmul {parts['dense']['matmul_size']}³)")
        ax_dense.set_ylim(bottom=0)
        ax_dense.legend(fontsize=8)
        ax_dense.grid(True, alpha=0.3)

    bars: list[tuple[str, float]] = []
    if "sliding" in parts:
        bars += [
            ("sliding fwd", parts["sliding"]["forward"]["speedup"]),
            ("sliding fwd+bwd", parts["sliding"]["train"]["speedup"]),
        ]
    if "causal" in parts:
        bars += [
            ("causal skip fwd", parts["causal"]["forward"]["speedup_vs_no_skipping"]),
            ("causal skip fwd+bwd", parts["causal"]["train"]["speedup_vs_no_skipping"]),
        ]
    if "ragged" in parts:
        bars += [
            ("ragged layer inf", parts["ragged"]["inference"]["layer_speedup"]),
            ("ragged layer train", parts["ragged"]["training"]["layer_speedup"]),
            ("ragged core inf", parts["ragged"]["inference"]["core_speedup"]),
        ]
    if "dense" in parts:
        bars += [
            ("dense SDPA/tiled fwd", 1 / parts["dense"]["tiled_over_sdpa_forward"])
            if parts["dense"]["tiled_over_sdpa_forward"]
            else ("dense fwd", 0.0),
            ("dense SDPA/tiled fwd+bwd", 1 / parts["dense"]["train"]["tiled_over_sdpa"]),
        ]
    if bars:
        labels, values = zip(*bars, strict=True)
        ax_speed.barh(labels, values, color="tab:blue")
        for i, value in enumerate(values):
            ax_speed.text(value, i, f" {value:.2f}x", va="center", fontsize=8)
        ax_speed.axvline(1.0, color="black", linewidth=1)
        ax_speed.set_xscale("log")
        ax_speed.set_xlabel("speedup of the library's path (contender time / ours)")
        ax_speed.set_title("speedups")
        ax_speed.invert_yaxis()
        ax_speed.grid(True, axis="x", alpha=0.3)

    if "decode" in parts:
        decode = parts["decode"]
        rows = decode["checkpoints"]
        tokens = [r["tokens"] for r in rows]
        for key in ("sliding_window", "full_kv_cache"):
            ax_dec_time.plot(tokens, [r[key]["median_ms_per_token"] for r in rows], "o-", label=key)
            ax_dec_mem.plot(
                tokens, [r[key]["held"] / 1e6 for r in rows], "o-", label=f"{key} (held)"
            )
        ax_dec_time.axvline(decode["window"], color="grey", linestyle=":")
        ax_dec_time.set_ylim(bottom=0)
        ax_dec_time.set_xlabel("tokens decoded")
        ax_dec_time.set_ylabel("median ms per token (last window)")
        ax_dec_time.set_title(f"decoding, window {decode['window']}, d_model {decode['d_model']}")
        ax_dec_time.legend(fontsize=8)
        ax_dec_time.grid(True, alpha=0.3)
        ax_dec_mem.set_xlabel("tokens decoded")
        ax_dec_mem.set_ylabel("cache MB holding positions")
        ax_dec_mem.set_title("decoding cache memory")
        ax_dec_mem.legend(fontsize=8)
        ax_dec_mem.grid(True, alpha=0.3)

    ax_targets.axis("off")
    lines = ["targets"]
    for row in payload["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
        measured = "n/a" if row["measured"] is None else f"{row['measured']:.3g}"
        sign = ">=" if row["higher_is_better"] else "<="
        lines.append(f"{mark:6s} {row['target']}: {measured} (goal {sign} {row['goal']:.3g})")
    ax_targets.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)

    fig.suptitle(
        f"scale: batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, fp32, {meta['threads']} "
        f"threads, torch {meta['torch']}, {meta['cpu']}, load {meta['load_average_start']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test at small sizes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--out", type=Path, help="output stem (default results/scale[_quick])")
    parser.add_argument(
        "--replot", action="store_true", help="recompute the targets and redraw from the JSON"
    )
    parser.add_argument("--memory-point", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_point:
        kind, n, batch, heads = args.memory_point
        print(json.dumps(memory_point(kind, int(n), int(batch), int(heads))))
        return
    stem = args.out or RESULTS / ("scale_quick" if args.quick else "scale")
    if args.replot:
        payload = json.loads(stem.with_suffix(".json").read_text())
        payload["targets"] = targets(payload["parts"])  # the targets as this script states them
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        plot(payload, stem.with_suffix(".png"))
        print(
            f"rewrote the targets of {stem.with_suffix('.json')}, wrote {stem.with_suffix('.png')}"
        )
        return

    torch.set_num_threads(THREADS)
    meta: dict[str, Any] = {
        "benchmark": "scale",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "multihead": multihead.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load_average(),
        "batch": BATCH,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "float32",
        "quick": args.quick,
        "timing": dict(
            zip(("target_seconds", "min_repeats", "max_repeats"), TIMING[args.quick], strict=True)
        ),
        "tile": [online_softmax.BLOCK_Q, online_softmax.BLOCK_K],
        "timing_method": "interleaved round-robin, order rotating each round; medians",
        "memory_method": "peak RSS growth (VmHWM reset via /proc/self/clear_refs) of one "
        "forward+backward in a fresh subprocess, after a warm-up at N=128",
    }
    print(
        f"torch {torch.__version__}, {THREADS} threads, {meta['cpu']}, "
        f"load {meta['load_average_start']}"
    )
    runners = {
        "memory": part_memory,
        "dense": part_dense,
        "sliding": part_sliding,
        "causal": part_causal,
        "ragged": part_ragged,
        "decode": part_decode,
    }
    started = time.perf_counter()
    parts: dict[str, Any] = {}
    for name in args.parts or PARTS:
        part_start = time.perf_counter()
        parts[name] = runners[name](args.quick)
        parts[name]["elapsed_s"] = round(time.perf_counter() - part_start, 1)
        gc.collect()
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = load_average()
    payload = {"meta": meta, "targets": targets(parts), "parts": parts}
    for row in payload["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
        measured = "n/a" if row["measured"] is None else f"{row['measured']:.3g}"
        print(f"{mark:6s} {row['target']}: {measured} (goal {row['goal']:.3g}) — {row['what']}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, png_path)
    print(f"\nwrote {json_path} and {png_path} in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
