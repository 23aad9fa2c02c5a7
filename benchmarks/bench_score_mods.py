"""ALiBi as a score mod against ALiBi as a dense bias: peak memory and time, forward + backward.

The dense-bias path is what an ALiBi layer did before score mods: build the (1, heads, N, N)
bias (`positional.ALiBi`), mask it causally and hand it to SDPA. The score-mod path is
`multihead.attention(q, k, v, causal=True, score_mod=score_mods.alibi(heads))`, which the
tiled kernel computes span by span. Each memory point runs in a fresh subprocess (peak RSS
growth, VmHWM reset through /proc/self/clear_refs after a warm-up), B=1, H=8, D=64, fp32.

    python benchmarks/bench_score_mods.py           # N = 2048, 4096, 8192
    python benchmarks/bench_score_mods.py --quick   # N = 256, 512: for the tests

Writes benchmarks/results/score_mods.json and .png (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import cpu_model, load_average, proc_status, write_report

import multihead
from multihead import score_mods
from multihead.positional import ALiBi

RESULTS = Path(__file__).parent / "results"
HEADS, HEAD_DIM = 8, 64


def score_mod_path(q, k, v):
    return multihead.attention(q, k, v, causal=True, score_mod=score_mods.alibi(q.shape[1]))


def dense_bias_path(q, k, v):
    n = q.shape[2]
    bias = ALiBi(q.shape[1])(n, n)  # (1, heads, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~causal, -torch.inf))


PATHS = {"score_mod": score_mod_path, "dense_bias": dense_bias_path}


def qkv(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, HEADS, n, HEAD_DIM, generator=generator).requires_grad_() for _ in range(3)
    )


def point(kind: str, n: int) -> dict:
    """In a fresh process: peak RSS growth and time of one forward + backward."""
    torch.set_num_threads(2)
    run = PATHS[kind]
    run(*qkv(128)).sum().backward()  # one-time allocations come first
    q, k, v = qkv(n)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = proc_status("VmRSS")
    start = time.perf_counter()
    run(q, k, v).sum().backward()
    elapsed = time.perf_counter() - start
    return {"kind": kind, "n": n, "peak_bytes": proc_status("VmHWM") - base, "seconds": elapsed}


def measure(kind: str, n: int) -> dict:
    command = [sys.executable, __file__, "--point", kind, str(n)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(n: int) -> float:
    """Largest difference of the two paths' outputs at size n."""
    q, k, v = (t.detach() for t in qkv(n))
    return float((score_mod_path(q, k, v) - dense_bias_path(q, k, v)).abs().max())


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind in PATHS:
        rows = [p for p in report["points"] if p["kind"] == kind]
        ax.plot([p["n"] for p in rows], [p["peak_bytes"] / 1e6 for p in rows], "o-", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("peak memory growth, MB")
    ax.set_title(f"ALiBi, causal, forward + backward (B=1, H={HEADS}, D={HEAD_DIM})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "score_mods.json")
    parser.add_argument("--point", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]))))
        return
    sizes = (256, 512) if args.quick else (2048, 4096, 8192)
    points = []
    for n in sizes:
        for kind in PATHS:
            points.append(measure(kind, n))
            print(json.dumps(points[-1]), flush=True)

    def peak(kind: str, n: int) -> int:
        return next(p["peak_bytes"] for p in points if p["kind"] == kind and p["n"] == n)

    report = {
        "shape": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32"},
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "load_average": load_average(),
        "method": "peak RSS growth of one forward+backward in a fresh subprocess",
        "points": points,
        "score_mod_over_dense": {n: peak("score_mod", n) / peak("dense_bias", n) for n in sizes},
        "max_abs_difference": agreement(sizes[0]),
    }
    print(json.dumps(report["score_mod_over_dense"]))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
