"""Ring attention benchmark: memory per rank and time as the world grows at a fixed length.

Causal self-attention on zigzag shards (`multihead.distributed.ring_attention`), total
length N = 16384, batch 1, 8 heads, head_dim 64, fp32, forward + backward. Every
configuration runs in fresh processes (torch.multiprocessing, start method "spawn", gloo on
a file store):

- one process, no ring: the tiled kernel on the whole sequence
  (`multihead.attention(..., causal=True, kernel="tiled")`), with 1 and with 2 threads;
- ring attention over 1, 2 and 4 ranks, 1 thread per rank.

The machine has 2 cores: 2 ranks use both, 4 ranks oversubscribe them two to a core, so
past 2 ranks time can only get worse; the memory curve is what 4 ranks show.

Memory per rank: the peak RSS growth during the timed forward + backward passes (VmHWM reset
through /proc/self/clear_refs after a warm-up at a small length and after the inputs exist),
plus the bytes of the rank's inputs (its query, key, value shards and output gradient), so
the number is what the rank needs for attention, without the interpreter and torch
libraries. Time: each repeat starts at a barrier; a repeat's time is the slowest rank's;
the median over repeats is kept.

    .venv/bin/python benchmarks/bench_ring.py            # full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_ring.py --quick    # smoke test, small sizes

Writes ``results/ring.json`` and ``results/ring.png`` (``ring_quick.*`` with --quick).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import argparse
import datetime
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_common import load_average, proc_status
from torch import Tensor

import multihead
from multihead.distributed import ring as ring_module
from multihead.distributed import ring_attention, shard_sequence

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM, BATCH = 8, 64, 1
# (full, quick)
LENGTH = {False: 16384, True: 512}
WARMUP_LENGTH = {False: 1024, True: 64}
CHECK_LENGTH = 509  # odd: uneven shards, checked against one process after the timing
REPEATS = {False: 3, True: 1}
WORLDS = {False: (1, 2, 4), True: (1, 2)}
ONE_PROCESS_THREADS = {False: (1, 2), True: (1,)}
COLOURS = {1: "tab:green", 2: "tab:red"}  # one-process lines, by thread count
# (goal, what). Memory per rank is its input shards plus ~4 shard-sized tensors alone and
# ~8 in a ring (the next key/value shard in flight, the gradient sums travelling): 1/world
# from 2 ranks on, with one step of ~1.5x between 1 and 2.
TARGETS = {
    "memory_4_over_2": (0.6, "peak memory per rank, 4 ranks / 2 ranks (ideal 0.5)"),
    "memory_4_over_1": (0.5, "peak memory per rank, 4 ranks / 1 rank (ideal 0.25)"),
    "time_2_over_one_process_2_threads": (
        1.1,
        "time of 2 ranks (1 thread each) / one process with 2 threads: the same 2 cores",
    ),
}
MMAP_THRESHOLD = "131072"


def inputs(n: int, rank: int, world: int, grad: bool) -> list[Tensor]:
    """This rank's zigzag shards of (query, key, value, output gradient) of length n."""
    generator = torch.Generator().manual_seed(n)
    whole = [torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=generator) for _ in range(4)]
    shards = [shard_sequence(x, rank, world, dim=2, zigzag=True) for x in whole]
    return [s.requires_grad_(grad and i < 3) for i, s in enumerate(shards)]


def attend(kind: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if kind == "ring":
        return ring_attention(q, k, v, causal=True, zigzag=True)
    return multihead.attention(q, k, v, causal=True, kernel="tiled")


def worker(
    rank: int,
    world: int,
    kind: str,
    threads: int,
    length: int,
    quick: bool,
    store: str,
    out_dir: str,
) -> None:
    """One rank (or the one process): warm up, measure, check, write rank<r>.json."""
    torch.set_num_threads(threads)
    if kind == "ring":
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=30),
        )

    def barrier() -> None:
        if kind == "ring":
            dist.barrier()

    waited = [0.0]  # seconds blocked on transfers: what the overlap did not hide
    unwrapped = ring_module._wait

    def timed_wait(works: list[dist.Work]) -> None:
        start = time.perf_counter()
        unwrapped(works)
        waited[0] += time.perf_counter() - start

    ring_module._wait = timed_wait

    q, k, v, grad_output = inputs(WARMUP_LENGTH[quick], rank, world, grad=True)
    attend(kind, q, k, v).backward(grad_output)  # thread pools, connections, kernels
    del q, k, v, grad_output
    q, k, v, grad_output = inputs(length, rank, world, grad=True)
    input_bytes = sum(x.numel() * x.element_size() for x in (q, k, v, grad_output))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = proc_status("VmRSS")
    if proc_status("VmHWM") > base + (1 << 20):
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    seconds = []
    waited[0] = 0.0
    for _ in range(REPEATS[quick]):
        for x in (q, k, v):
            x.grad = None
        barrier()
        start = time.perf_counter()
        attend(kind, q, k, v).backward(grad_output)
        seconds.append(time.perf_counter() - start)
    growth = proc_status("VmHWM") - base
    wait_seconds = waited[0] / REPEATS[quick]
    del q, k, v, grad_output

    # Correctness at a small odd length: this rank's shard against one process.
    q, k, v, _ = inputs(CHECK_LENGTH, rank, world, grad=False)
    whole = inputs(CHECK_LENGTH, 0, 1, grad=False)[:3]
    with torch.no_grad():
        mine = attend(kind, q, k, v)
        expected = multihead.attention(*whole, causal=True, kernel="reference")
        expected = shard_sequence(expected, rank, world, dim=2, zigzag=True)
    deviation = float((mine - expected).abs().max())
    if kind == "ring":
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "seconds": seconds,
                "growth_bytes": growth,
                "input_bytes": input_bytes,
                "deviation": deviation,
                "transfer_wait_seconds": wait_seconds,
            }
        )
    )


def run(kind: str, world: int, threads: int, length: int, quick: bool) -> dict[str, Any]:
    """Spawn the ranks of one configuration and summarise them."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            worker,
            args=(world, kind, threads, length, quick, str(Path(out_dir, "store")), out_dir),
            nprocs=world,
            start_method="spawn",
        )
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    per_repeat = [max(times) for times in zip(*(r["seconds"] for r in ranks), strict=True)]
    totals = [r["growth_bytes"] + r["input_bytes"] for r in ranks]
    return {
        "kind": kind,
        "world": world,
        "threads_per_rank": threads,
        "seconds": statistics.median(per_repeat),
        "seconds_per_repeat": [round(t, 4) for t in per_repeat],
        "peak_bytes_per_rank": max(totals),
        "mean_bytes_per_rank": statistics.fmean(totals),
        "per_rank": ranks,
        "deviation": max(r["deviation"] for r in ranks),
        "transfer_wait_seconds": max(r["transfer_wait_seconds"] for r in ranks),
    }


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, single = payload["ring"], payload["one_process"]
    worlds = [r["world"] for r in rows]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    mem = [r["peak_bytes_per_rank"] / 2**20 for r in rows]
    ax_mem.plot(worlds, mem, "o-", label="ring attention, peak per rank")
    ax_mem.plot(worlds, [mem[0] / w for w in worlds], "k:", label="ideal: 1/world")
    for world, mib in zip(worlds, mem, strict=True):
        ax_mem.annotate(f"{mib:.0f} MiB (x{mib / mem[0]:.2f})", (world, mib), fontsize=8)
    for one in single:
        ax_mem.axhline(
            one["peak_bytes_per_rank"] / 2**20,
            color=COLOURS[one["threads_per_rank"]],
            linestyle="--",
            alpha=0.6,
            label=f"one process, tiled, {one['threads_per_rank']} thread(s)",
        )
    ax_mem.set_xscale("log", base=2)
    ax_mem.set_xticks(worlds, [str(w) for w in worlds])
    ax_mem.set_xlabel("ranks (world size)")
    ax_mem.set_ylabel("MiB per rank: inputs + peak RSS growth")
    ax_mem.set_title("memory per rank at fixed total length")
    ax_mem.set_ylim(bottom=0)
    ax_mem.legend(fontsize=8)
    ax_mem.grid(True, alpha=0.3)

    seconds = [r["seconds"] for r in rows]
    ax_time.plot(worlds, seconds, "o-", label="ring attention (1 thread/rank)")
    for world, row in zip(worlds, rows, strict=True):
        ax_time.annotate(
            f"{row['seconds']:.1f} s (waiting {row['transfer_wait_seconds']:.1f} s)",
            (world, row["seconds"]),
            fontsize=8,
        )
    for one in single:
        ax_time.axhline(
            one["seconds"],
            color=COLOURS[one["threads_per_rank"]],
            linestyle="--",
            alpha=0.6,
            label=f"one process, tiled, {one['threads_per_rank']} thread(s)",
        )
    ax_time.axvline(2, color="grey", linestyle=":", label="cores on this machine")
    ax_time.set_xscale("log", base=2)
    ax_time.set_xticks(worlds, [str(w) for w in worlds])
    ax_time.set_xlabel("ranks (world size)")
    ax_time.set_ylabel("forward + backward, seconds (slowest rank)")
    ax_time.set_title("time")
    ax_time.set_ylim(bottom=0)
    ax_time.legend(fontsize=8)
    ax_time.grid(True, alpha=0.3)
    meta = payload["meta"]
    fig.suptitle(
        f"ring attention, causal zigzag: N={meta['length']}, batch {BATCH}, {HEADS} heads, "
        f"head_dim {HEAD_DIM}, fp32; {meta['cpu_count']} cores, torch {meta['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test at small sizes")
    parser.add_argument("--out", type=Path, help="output stem (default results/ring[_quick])")
    parser.add_argument("--length", type=int, help=f"total length (default {LENGTH[False]})")
    args = parser.parse_args(argv)
    quick = args.quick
    # Pinned, glibc returns every freed tensor to the OS at once, so RSS follows the live
    # tensors; its default (a threshold that rises as large blocks are freed) keeps freed
    # heap memory, which here added ~60 MiB per ring rank, depending on allocation order.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)  # read by the ranks
    length = LENGTH[quick] if args.length is None else args.length
    stem = args.out or RESULTS / ("ring_quick" if quick else "ring")
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "benchmark": "ring",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "multihead": multihead.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "length": length,
        "batch": BATCH,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "float32",
        "attention": "causal, zigzag shards, forward + backward",
        "repeats": REPEATS[quick],
        "quick": quick,
        "backend": "gloo on a file store, one process per rank (spawn)",
        "threads": "1 per rank; 2 cores, so 4 ranks oversubscribe them",
        "memory_method": "per rank: bytes of its input shards (q, k, v, output gradient) plus "
        "peak RSS growth (VmHWM reset via /proc/self/clear_refs after a warm-up and after the "
        "inputs exist) over the timed forward+backward passes; glibc's mmap threshold pinned "
        "(MALLOC_MMAP_THRESHOLD_) so that freed tensors leave RSS at once",
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
        "timing_method": "each repeat starts at a barrier; the slowest rank's time; median",
        "transfer_wait": "seconds per forward+backward a rank spent blocked waiting for ring "
        "transfers: what the overlap with compute did not hide, plus waiting for a slower "
        "neighbour; max over ranks",
    }
    print(f"torch {torch.__version__}, N={length}, load {meta['load_average_start']}")
    one_process = []
    for threads in ONE_PROCESS_THREADS[quick]:
        row = run("tiled", 1, threads, length, quick)
        one_process.append(row)
        print(
            f"one process, {threads} thread(s): {row['seconds']:.2f} s, "
            f"{row['peak_bytes_per_rank'] / 2**20:.0f} MiB",
            flush=True,
        )
    ring = []
    for world in WORLDS[quick]:
        row = run("ring", world, 1, length, quick)
        ring.append(row)
        print(
            f"ring, {world} rank(s): {row['seconds']:.2f} s "
            f"({row['transfer_wait_seconds']:.3f} s waiting for transfers), "
            f"{row['peak_bytes_per_rank'] / 2**20:.0f} MiB per rank (max)",
            flush=True,
        )
    for row in ring:
        row["memory_over_world_1"] = row["peak_bytes_per_rank"] / ring[0]["peak_bytes_per_rank"]
        for one in one_process:
            threads = one["threads_per_rank"]
            row[f"time_over_one_process_{threads}_thread"] = row["seconds"] / one["seconds"]
            row[f"memory_over_one_process_{threads}_thread"] = (
                row["peak_bytes_per_rank"] / one["peak_bytes_per_rank"]
            )
    by_world = {row["world"]: row for row in ring}
    measured = {
        "memory_4_over_2": (4, 2, "peak_bytes_per_rank"),
        "memory_4_over_1": (4, 1, "peak_bytes_per_rank"),
    }
    targets = []
    for name, (goal, what) in TARGETS.items():
        value = None
        if name in measured:
            top, bottom, key = measured[name]
            if top in by_world and bottom in by_world:
                value = by_world[top][key] / by_world[bottom][key]
        elif 2 in by_world and len(one_process) > 1:
            value = by_world[2]["time_over_one_process_2_thread"]
        met = None if value is None else value <= goal
        targets.append({"target": name, "measured": value, "goal": goal, "met": met, "what": what})
        if value is not None:
            print(f"{'met' if met else 'MISSED':6s} {name}: {value:.3g} (goal <= {goal}) — {what}")
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = load_average()
    payload = {
        "meta": meta,
        "targets": targets,
        "one_process": one_process,
        "ring": ring,
        "deviation_vs_one_process": max(r["deviation"] for r in ring + one_process),
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, png_path)
    print(f"wrote {json_path} and {png_path} in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
