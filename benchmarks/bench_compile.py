"""torch.compile of our layer against torch.compile of a hand-written Linear + SDPA layer.

Both compiled with the default (inductor) backend, same weights, batch 4, N = 1024,
d_model 512, 8 heads, causal, fp32, 2 threads; forward and forward + backward, interleaved
rounds, paired ratios (median over rounds of ours / the hand-written layer in the same round).
Compile time is excluded (a warm-up call before timing) and reported. A second part times
a training step (forward, loss, backward, AdamW) of a small modern `TransformerLM` (4 layers,
d_model 256, 4 heads, 2 key/value heads, batch 8 × 256 tokens) compiled against eager.

    python benchmarks/bench_compile.py            # the full size
    python benchmarks/bench_compile.py --quick    # a small size, for the tests

Writes benchmarks/results/compile.json and .png (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import cpu_model, interleave, load_average, paired_ratio, timed, write_report
from torch import nn

import multihead

RESULTS = Path(__file__).parent / "results"


class HandWritten(nn.Module):
    """The layer in plain torch: one input projection, SDPA, the output projection."""

    def __init__(self, ours: multihead.MultiHeadAttention) -> None:
        super().__init__()
        self.heads = ours.num_heads
        self.in_proj = nn.Linear(ours.embed_dim, 3 * ours.embed_dim)
        self.out_proj = nn.Linear(ours.embed_dim, ours.embed_dim)
        with torch.no_grad():  # the same weights as ours
            self.in_proj.load_state_dict(ours.in_proj.state_dict())
            self.out_proj.load_state_dict(ours.out_proj.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Ours(nn.Module):
    def __init__(self, layer: multihead.MultiHeadAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, causal=True)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    layer = multihead.MultiHeadAttention(args.d_model, args.heads)
    modules = {"ours": Ours(layer), "hand_written": HandWritten(layer)}
    x = torch.randn(args.batch, args.n, args.d_model)
    with torch.no_grad():
        difference = float((modules["ours"](x) - modules["hand_written"](x)).abs().max())
    compiled, compile_s = {}, {}
    for name, module in modules.items():
        compiled[name] = torch.compile(module)
        start = time.perf_counter()
        compiled[name](x.requires_grad_()).sum().backward()  # forward and backward graphs
        with torch.no_grad():
            compiled[name](x)  # and the inference graph: a grad-mode change recompiles
        compile_s[name] = time.perf_counter() - start
    results = {}
    for mode in ("forward", "forward_backward"):

        def step(name: str, mode: str = mode):
            if mode == "forward":
                return lambda _: timed(lambda: compiled[name](x))
            return lambda _: timed(lambda: compiled[name](x).sum().backward())

        steps = {name: step(name) for name in compiled}
        if mode == "forward":
            with torch.no_grad():
                times = interleave(steps, args.rounds)
        else:
            times = interleave(steps, args.rounds)
        results[mode] = {
            "ours_s": min(t for _, t in times["ours"]),
            "hand_written_s": min(t for _, t in times["hand_written"]),
            "ours_over_hand_written": paired_ratio(times["ours"], times["hand_written"]),
        }
        print(mode, json.dumps(results[mode]), flush=True)
    return {
        "lm_training": lm_training(args),
        "shape": {"batch": args.batch, "n": args.n, "d_model": args.d_model, "heads": args.heads},
        "causal": True,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "load_average": load_average(),
        "compile_s": compile_s,
        "max_abs_difference": difference,
        "ratio": "paired: median over rounds of ours / the hand-written layer in the same round",
        "results": results,
    }


def lm_training(args: argparse.Namespace) -> dict:
    """A training step of a small modern LM, compiled (inductor) against eager."""
    sizes = (2, 64, 64, 2, 2) if args.quick else (4, 256, 256, 8, 4)
    layers, d_model, seq, batch, heads = sizes
    config = multihead.LMConfig.modern(
        1000, d_model=d_model, num_heads=heads, num_kv_heads=max(1, heads // 2),
        num_layers=layers, dim_feedforward=4 * d_model, max_len=seq,
    )  # fmt: skip
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    steps = {}
    compile_s = 0.0
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = multihead.TransformerLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        forward = torch.compile(model) if name == "compiled" else model

        def step(forward=forward, optimizer=optimizer) -> None:
            logits = forward(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        start = time.perf_counter()
        step()  # warm-up (compiles the compiled one)
        if name == "compiled":
            compile_s = time.perf_counter() - start
        steps[name] = lambda _, step=step: timed(step)
    times = interleave(steps, args.rounds)
    row = {
        "layers": layers, "d_model": d_model, "heads": heads, "batch": batch, "seq": seq,
        "eager_s": min(t for _, t in times["eager"]),
        "compiled_s": min(t for _, t in times["compiled"]),
        "compiled_over_eager": paired_ratio(times["compiled"], times["eager"]),
        "compile_s": compile_s,
    }  # fmt: skip
    print("lm training step", json.dumps(row), flush=True)
    return row


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["results"])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(modes, [report["results"][m]["ours_over_hand_written"] for m in modes])
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylabel("compiled ours / compiled Linear+SDPA")
    shape = report["shape"]
    ax.set_title(f"torch.compile, B={shape['batch']} N={shape['n']} d={shape['d_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="B=1, N=64, d=32: for the tests")
    parser.add_argument("--out", type=Path, default=RESULTS / "compile.json")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.n, args.d_model, args.heads, args.rounds = 1, 64, 32, 4, 2
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    report = run(args)
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
