"""Layer benchmark: `multihead.MultiHeadAttention` against the layers it should match.

One process, two threads, batch 4, d_model 512, 8 heads, fp32, self-attention over N
positions. Every contender holds the same weights; each is timed in inference (forward under
``torch.inference_mode()``, modules in eval mode) and in training (forward + backward of
``output.sum()``, gradients on the parameters and on the input). Contenders are interleaved
round-robin, so a noisy neighbour slows all of them alike, and the median is kept.

Ratios are time_x / time_b, against the hand-written Linear+SDPA layer (b). Targets:
(a) within 5% of (b); (e), the library with weights requested, at least as fast as (d),
torch's layer with weights requested.

    .venv/bin/python benchmarks/bench_layer.py            # full run (~10 min on an idle machine)
    .venv/bin/python benchmarks/bench_layer.py --quick    # smoke test: N in 128, 256
    .venv/bin/python benchmarks/bench_layer.py --sizes 512 1024

Writes ``results/layer.json`` and ``results/layer.png`` (``layer_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import cpu_model
from torch import Tensor, nn

import multihead
from multihead import MultiHeadAttention

BATCH = 4
D_MODEL = 512
HEADS = 8
THREADS = 2
SIZES = (128, 256, 512, 1024, 2048, 4096)
QUICK_SIZES = (128, 256)
WARMUP = 2
MIN_REPEATS = 3
MAX_REPEATS = 20
TARGET_SECONDS = 1.0  # per contender, per size and mode
MAX_MEMORY_GB = 12.0
RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "b"
MODES = ("inference", "training")

# -- the hand-written layers -------------------------------------------------------------------


class LinearSDPA(nn.Module):
    """(b) One qkv Linear, split heads, torch SDPA, merge heads, out Linear."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, 3E) → three (B, H, N, E/H) views."""
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: Tensor) -> Tensor:
        y = self.attend(*self.heads(x))  # (B, H, N, E/H)
        return self.out(y.transpose(1, 2).flatten(2))


class NaiveAttention(LinearSDPA):
    """(f) The formula written out: softmax(q kᵀ / sqrt(d)) v, the N×N matrix in memory."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        weights = torch.softmax(scores, dim=-1)
        return weights @ v


# -- contenders --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    modules: tuple[nn.Module, ...]
    run: Callable[[Tensor], Tensor]
    # Peak memory ≈ n2_buffers × (B·H·N² fp32 scores) per mode: peak RSS growth of one call
    # measured at N=1024 and 2048, rounded up. Flash-style kernels never build the N×N matrix.
    n2_buffers: dict[str, float] = field(default_factory=dict)


def build_contenders(seed: int = 0) -> list[Contender]:
    torch.manual_seed(seed)
    mha = MultiHeadAttention(D_MODEL, HEADS)
    torch_mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    sdpa = LinearSDPA(D_MODEL, HEADS)
    naive = NaiveAttention(D_MODEL, HEADS)
    with torch.no_grad():
        # The library's initialisation everywhere; random biases so they matter too.
        mha.in_proj.bias.normal_(std=0.02)
        mha.out_proj.bias.normal_(std=0.02)
        w_in, b_in = mha.in_proj.weight, mha.in_proj.bias
        w_out, b_out = mha.out_proj.weight, mha.out_proj.bias
        torch_mha.in_proj_weight.copy_(w_in)
        torch_mha.in_proj_bias.copy_(b_in)
        torch_mha.out_proj.weight.copy_(w_out)
        torch_mha.out_proj.bias.copy_(b_out)
        for layer in (sdpa, naive):
            layer.qkv.weight.copy_(w_in)
            layer.qkv.bias.copy_(b_in)
            layer.out.weight.copy_(w_out)
            layer.out.bias.copy_(b_out)

    def mha_fast(x: Tensor) -> Tensor:
        return mha(x, need_weights=False)

    def mha_weights(x: Tensor) -> Tensor:
        out, _weights = mha(x, need_weights="mean")
        return out

    def torch_fast(x: Tensor) -> Tensor:
        return torch_mha(x, x, x, need_weights=False)[0]

    def torch_weights(x: Tensor) -> Tensor:
        out, _weights = torch_mha(x, x, x, need_weights=True)
        return out

    return [
        Contender("a", "multihead MHA", (mha,), mha_fast),
        Contender("b", "Linear+SDPA", (sdpa,), sdpa),
        # torch's inference fast path (native MHA) materialises the scores even without weights.
        Contender("c", "torch MHA", (torch_mha,), torch_fast, {"inference": 1.5}),
        Contender(
            "d",
            "torch MHA +weights",
            (torch_mha,),
            torch_weights,
            {"inference": 1.5, "training": 4},
        ),
        Contender(
            "e", "multihead MHA +weights", (mha,), mha_weights, {"inference": 2.5, "training": 4}
        ),
        Contender("f", "naive formula", (naive,), naive, {"inference": 2.5, "training": 4}),
    ]


def estimated_gb(contender: Contender, mode: str, n: int) -> float:
    """Peak memory estimate: the N×N buffers plus a generous allowance for activations."""
    square = BATCH * HEADS * n * n * 4
    linear = 32 * BATCH * n * D_MODEL * 4
    return (contender.n2_buffers.get(mode, 0.0) * square + linear) / 1e9


# -- timing ------------------------------------------------------------------------------------


def make_step(contender: Contender, mode: str, x: Tensor) -> Callable[[], float]:
    """A function that runs one forward (+ backward) and returns its wall time in seconds."""
    params = [p for module in contender.modules for p in module.parameters()]

    if mode == "inference":

        def infer() -> float:
            with torch.inference_mode():
                start = time.perf_counter()
                out = contender.run(x)
                elapsed = time.perf_counter() - start
            del out
            return elapsed

        return infer

    def train() -> float:
        x.grad = None
        for p in params:
            p.grad = None
        start = time.perf_counter()
        loss = contender.run(x).sum()
        loss.backward()
        return time.perf_counter() - start

    return train


@dataclass
class Result:
    mode: str
    n: int
    contender: str
    median_s: float | None = None
    min_s: float | None = None
    repeats: int = 0
    times_s: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the round-robin round of each time
    ratio: float | None = None  # median time / median time of (b)
    paired_ratio: float | None = None  # median over rounds of time / time of (b) nearby
    skipped: str | None = None


def bench_size(
    contenders: list[Contender], mode: str, n: int, target_s: float, max_repeats: int
) -> list[Result]:
    torch.manual_seed(n)
    x = torch.randn(BATCH, n, D_MODEL, requires_grad=(mode == "training"))
    for contender in contenders:
        for module in contender.modules:
            module.train(mode == "training")  # dropout is 0: only the fast paths differ

    results = {c.key: Result(mode, n, c.key) for c in contenders}
    steps: dict[str, Callable[[], float]] = {}
    repeats: dict[str, int] = {}
    for contender in contenders:
        gb = estimated_gb(contender, mode, n)
        if gb > MAX_MEMORY_GB:
            results[contender.key].skipped = f"needs ~{gb:.0f} GB > {MAX_MEMORY_GB:.0f} GB"
            print(f"  skip {mode} N={n} ({contender.key}) {contender.label}: ~{gb:.1f} GB")
            continue
        step = make_step(contender, mode, x)
        warm = [step() for _ in range(WARMUP)]
        steps[contender.key] = step
        repeats[contender.key] = max(MIN_REPEATS, min(max_repeats, math.ceil(target_s / warm[-1])))

    # Round-robin, starting one later each round; a contender with fewer repeats than there
    # are rounds has its calls spread evenly over them, so all share the same stretch of time.
    keys = list(steps)
    total = max(repeats.values(), default=0)
    for round_index in range(total):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            due = (round_index + 1) * repeats[key] // total > round_index * repeats[key] // total
            if due:
                results[key].times_s.append(steps[key]())
                results[key].rounds.append(round_index)

    for result in results.values():
        if result.times_s:
            result.repeats = len(result.times_s)
            result.median_s = statistics.median(result.times_s)
            result.min_s = min(result.times_s)
    base = results[BASELINE]
    for result in results.values():
        if result.median_s is not None and base.median_s is not None:
            result.ratio = result.median_s / base.median_s
            result.paired_ratio = paired_ratio(result, base)
    return list(results.values())


def paired_ratio(result: Result, base: Result) -> float:
    """Median of each time over the baseline's time in the nearest round: robust to drift."""
    ratios = []
    for round_index, elapsed in zip(result.rounds, result.times_s, strict=True):
        nearest = min(range(base.repeats), key=lambda i: abs(base.rounds[i] - round_index))
        ratios.append(elapsed / base.times_s[nearest])
    return statistics.median(ratios)


def check_same_outputs(contenders: list[Contender], n: int = 64) -> float:
    """Every contender computes the same function: the largest deviation from (b)."""
    x = torch.randn(2, n, D_MODEL)
    with torch.inference_mode():
        for contender in contenders:
            for module in contender.modules:
                module.eval()
        outs = {c.key: c.run(x) for c in contenders}
    worst = max((out - outs[BASELINE]).abs().max().item() for out in outs.values())
    if worst > 1e-4:
        raise RuntimeError(f"contenders disagree: max |difference| {worst:.2e}")
    return worst


# -- reporting ---------------------------------------------------------------------------------


def print_table(results: list[Result], contenders: list[Contender], sizes: list[int]) -> None:
    keys = [c.key for c in contenders]
    by = {(r.mode, r.n, r.contender): r for r in results}
    print("\n" + "  ".join(f"({c.key}) {c.label}" for c in contenders))
    for mode in MODES:
        print(f"\n{mode}: paired ratio time_x / time_b, median over rounds   (b = Linear+SDPA, ms)")
        print(f"{'N':>6} {'b ms':>9} " + " ".join(f"{k:>6}" for k in keys))
        for n in sizes:
            base = by[(mode, n, BASELINE)].median_s
            cells = []
            for key in keys:
                ratio = by[(mode, n, key)].paired_ratio
                cells.append(f"{ratio:6.2f}" if ratio is not None else f"{'skip':>6}")
            base_ms = f"{base * 1e3:9.2f}" if base is not None else f"{'-':>9}"
            print(f"{n:>6} {base_ms} " + " ".join(cells))


def headline(results: list[Result]) -> list[dict[str, object]]:
    by = {(r.mode, r.n, r.contender): r for r in results}
    rows: list[dict[str, object]] = []
    for mode, n in sorted({(r.mode, r.n) for r in results}):
        a, d, e = (by[(mode, n, key)] for key in "ade")
        e_vs_d = e.median_s / d.median_s if e.median_s and d.median_s else None
        e_vs_d_paired = None
        if e.median_s and d.median_s:
            e_vs_d_paired = paired_ratio(e, d)
        rows.append(
            {
                "mode": mode,
                "n": n,
                "a_vs_b": a.ratio,
                "a_vs_b_paired": a.paired_ratio,
                "a_within_5pct": a.paired_ratio is not None and a.paired_ratio <= 1.05,
                "e_vs_d": e_vs_d,
                "e_vs_d_paired": e_vs_d_paired,
                "e_not_slower_than_d": e_vs_d_paired is not None and e_vs_d_paired <= 1.0,
            }
        )
    return rows


def plot(results: list[Result], labels: dict[str, str], path: Path, title: str) -> None:
    """Two panels (inference, training): ratio to (b) against N, both axes logarithmic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ratios_seen = [r.paired_ratio for r in results if r.paired_ratio is not None] or [1.0]
    low, high = min(min(ratios_seen), 1.0) / 1.1, max(max(ratios_seen), 1.0) * 1.1
    ticks = [0.25, 0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, mode in zip(axes, MODES, strict=True):
        for key, label in labels.items():
            if key == BASELINE:
                continue
            points = [
                (r.n, r.paired_ratio)
                for r in results
                if r.mode == mode and r.contender == key and r.paired_ratio is not None
            ]
            if points:
                ns, ratios = zip(*sorted(points), strict=True)
                ax.plot(ns, ratios, marker="o", label=f"({key}) {label}")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="(b) Linear+SDPA")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted({r.n for r in results})))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(mode)
        ax.set_xlabel("sequence length N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time / time of Linear+SDPA (lower is faster)")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_title(meta: dict[str, object]) -> str:
    return (
        f"MHA layer, batch {meta['batch']}, d_model {meta['d_model']}, {meta['heads']} heads, "
        f"{meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}, {meta['cpu']}"
    )


def replot(stem: Path) -> None:
    """Redraw the PNG, and recompute the JSON's headline, from the JSON's timings."""
    payload = json.loads(stem.with_suffix(".json").read_text())
    results = [Result(**row) for row in payload["results"]]
    payload["headline"] = headline(results)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, payload["contenders"], stem.with_suffix(".png"), plot_title(payload["meta"]))
    print(f"wrote {stem.with_suffix('.png')}")


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: N in 128, 256")
    parser.add_argument("--sizes", type=int, nargs="+", help="sequence lengths to run")
    parser.add_argument("--out", type=Path, help="output stem (default results/layer[_quick])")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args(argv)
    stem = args.out or RESULTS / ("layer_quick" if args.quick else "layer")
    if args.replot:
        replot(stem)
        return

    torch.set_num_threads(THREADS)
    sizes = list(args.sizes or (QUICK_SIZES if args.quick else SIZES))
    target_s, max_repeats = (0.2, MIN_REPEATS) if args.quick else (TARGET_SECONDS, MAX_REPEATS)
    stem.parent.mkdir(parents=True, exist_ok=True)

    contenders = build_contenders()
    deviation = check_same_outputs(contenders)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}; "
        f"batch {BATCH}, d_model {D_MODEL}, {HEADS} heads, fp32; outputs agree to {deviation:.1e}"
    )
    q = torch.empty(BATCH, HEADS, sizes[0], D_MODEL // HEADS)
    kernels = {
        "a": multihead.explain(q, q, q),
        "e": multihead.explain(q, q, q, return_weights=True),
    }
    for key, line in kernels.items():
        print(f"({key}) runs {line}")

    results: list[Result] = []
    started = time.perf_counter()
    for n in sizes:
        for mode in MODES:
            rows = bench_size(contenders, mode, n, target_s, max_repeats)
            results.extend(rows)
            summary = " ".join(
                f"{r.contender}={r.ratio:.2f}" if r.ratio is not None else f"{r.contender}=skip"
                for r in rows
            )
            base_ms = next(r.median_s for r in rows if r.contender == BASELINE) or 0.0
            print(f"N={n:5d} {mode:9s} b={base_ms * 1e3:9.2f} ms  {summary}", flush=True)

    print_table(results, contenders, sizes)
    heads = headline(results)
    for row in heads:
        a_vs_b, e_vs_d = row["a_vs_b"], row["e_vs_d"]
        a_text = "a/b=n/a"
        if isinstance(a_vs_b, float):
            a_text = f"a/b={a_vs_b:.3f} {'ok' if row['a_within_5pct'] else 'MISS'}"
            a_text += f" (paired {row['a_vs_b_paired']:.3f})"
        e_text = "e/d=n/a (skipped)"
        if isinstance(e_vs_d, float):
            e_text = f"e/d={e_vs_d:.3f} {'ok' if row['e_not_slower_than_d'] else 'MISS'}"
            e_text += f" (paired {row['e_vs_d_paired']:.3f})"
        print(f"{row['mode']:9s} N={row['n']:5d}  {a_text}  {e_text}")

    meta = {
        "benchmark": "layer",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "multihead": multihead.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "batch": BATCH,
        "d_model": D_MODEL,
        "heads": HEADS,
        "dtype": "float32",
        "sizes": sizes,
        "quick": args.quick,
        "warmup": WARMUP,
        "repeats": {"min": MIN_REPEATS, "max": max_repeats, "target_seconds": target_s},
        "max_memory_gb": MAX_MEMORY_GB,
        "baseline": BASELINE,
        "ratio": "median time of contender / median time of (b)",
        "paired_ratio": "median over rounds of time / time of (b) in the nearest round",
        "max_output_deviation": deviation,
        "multihead_kernels": kernels,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    payload = {
        "meta": meta,
        "contenders": {c.key: c.label for c in contenders},
        "headline": heads,
        "results": [asdict(r) for r in results],
    }
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    title = plot_title(meta)
    plot(results, payload["contenders"], png_path, title)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
