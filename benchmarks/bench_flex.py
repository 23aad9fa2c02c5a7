"""Ours against torch's FlexAttention, compiled, on the masks and score mods it is built for.

Inference: `multihead.attention` (auto, nothing compiled) against
``torch.compile(flex_attention)`` with a block mask built once (compile time and block-mask
construction excluded), on the same inputs, side by side in one process, interleaved
rounds, paired ratios. Training: FlexAttention has no CPU backward, so ours is compared
with SDPA under the same mask as a dense tensor (forward + backward).

    python benchmarks/bench_flex.py            # B=4, H=8, N=8192, D=64, fp32, 2 threads
    python benchmarks/bench_flex.py --quick    # a small size, for the tests

Writes benchmarks/results/flex.json and flex.png (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import cpu_model, interleave, load_average, paired_ratio, timed, write_report

import multihead
from multihead import masks, score_mods

RESULTS = Path(__file__).parent / "results"


def document_lengths(total: int, count: int, low: int, high: int, seed: int = 0) -> list[int]:
    """``count`` lengths in [low, high] summing to ``total`` (seeded)."""
    if not count * low <= total <= count * high:
        raise ValueError(f"{count} lengths in [{low}, {high}] cannot sum to {total}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        lengths = torch.randint(low, high + 1, (count - 1,), generator=generator).tolist()
        last = total - sum(lengths)
        if low <= last <= high:
            return [*lengths, last]


def cases(n: int, window: int, prefix: int, heads: int) -> dict[str, dict]:
    """Each case: our mask / score mod, and Flex's mask_mod / score_mod for the same thing."""
    count, high = (13, n // 8) if n >= 8192 else (4, n // 2)  # 64..1024 tokens at 8192
    lengths = document_lengths(n, count, max(1, n // 128), high)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    slopes = score_mods.alibi(heads).slopes

    def window_mod(b, h, q, k):
        return (k <= q) & (q - k < window)

    def document_mod(b, h, q, k):
        return doc_ids[q] == doc_ids[k]

    def document_causal_mod(b, h, q, k):
        return (doc_ids[q] == doc_ids[k]) & (k <= q)

    def prefix_mod(b, h, q, k):
        return (k < prefix) | (k <= q)

    def causal_mod(b, h, q, k):
        return k <= q

    def alibi_score(score, b, h, q, k):
        return score + slopes[h] * (k - q)

    return {
        f"sliding window {window}": {
            "ours": {"mask": masks.sliding_window(n, window=window)},
            "flex": (window_mod, None),
        },
        f"{len(lengths)} documents": {
            "ours": {"mask": masks.documents(doc_ids)},
            "flex": (document_mod, None),
            "lengths": lengths,
        },
        f"{len(lengths)} documents, causal": {
            "ours": {"mask": masks.documents(doc_ids) & masks.causal(n)},
            "flex": (document_causal_mod, None),
        },
        f"prefix-LM ({prefix}) as a mask_mod": {
            "ours": {"mask": masks.from_function(prefix_mod, n, name="prefix_lm")},
            "flex": (prefix_mod, None),
        },
        "ALiBi score_mod, causal": {
            "ours": {"causal": True, "score_mod": score_mods.alibi(heads)},
            "flex": (causal_mod, alibi_score),
        },
    }


def dense_mask(case: dict, n: int, heads: int) -> torch.Tensor | None:
    """The case's mask (and score bias) as one dense tensor, for SDPA."""
    ours = case["ours"]
    if "mask" in ours:
        return ours["mask"].to_dense()
    bias = score_mods.alibi(heads).bias(
        torch.arange(heads).view(1, -1, 1, 1),
        torch.arange(n).view(1, 1, -1, 1),
        torch.arange(n).view(1, 1, 1, -1),
    )
    return bias.masked_fill(~masks.causal(n).to_dense(), -math.inf)


def run(args: argparse.Namespace) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    b, h, n, d = args.batch, args.heads, args.n, args.head_dim
    query, key, value = (torch.randn(b, h, n, d) for _ in range(3))
    # One compilation per case (each has its own mask_mod / score_mod), all under no_grad:
    # a change of grad mode would recompile, and past the limit Flex falls back to eager.
    torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    results = []
    for name, case in cases(n, args.window, args.prefix, h).items():
        if args.cases and not any(word in name for word in args.cases):
            continue
        mask_mod, score_mod = case["flex"]
        block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu")
        ours_kwargs = case["ours"]
        with torch.no_grad():
            start = time.perf_counter()
            flex_out = flex(query, key, value, block_mask=block_mask, score_mod=score_mod)
            compile_s = time.perf_counter() - start
            ours_out = multihead.attention(query, key, value, **ours_kwargs)
        error = float((ours_out - flex_out).abs().max())
        steps = {
            "flex": lambda _, m=block_mask, s=score_mod: timed(
                lambda: flex(query, key, value, block_mask=m, score_mod=s)
            ),
            "ours": lambda _, kw=ours_kwargs: timed(
                lambda: multihead.attention(query, key, value, **kw)
            ),
        }
        with torch.no_grad():
            times = interleave(steps, args.rounds)
        row = {
            "case": name,
            "flex_s": min(t for _, t in times["flex"]),
            "ours_s": min(t for _, t in times["ours"]),
            "ours_over_flex": paired_ratio(times["ours"], times["flex"]),
            "max_abs_difference": error,
            "flex_compile_s": compile_s,
            "explain": multihead.explain(query, key, value, **ours_kwargs),
        }
        if "lengths" in case:
            row["document_lengths"] = case["lengths"]
        if args.train:
            row.update(train(case, query, key, value, args))
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "explain"}), flush=True)
        print("   ", row["explain"], flush=True)
    return {
        "shape": {"batch": b, "heads": h, "n": n, "head_dim": d, "dtype": "float32"},
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "load_average": load_average(),
        "ratio": "paired: median over rounds of ours / the contender in the same round",
        "results": results,
    }


def train(case: dict, query, key, value, args) -> dict:
    """Forward + backward: ours against SDPA with the dense mask (Flex has no CPU backward)."""
    dense = dense_mask(case, args.n, args.heads)
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]

    def ours(_: int) -> float:
        return timed(lambda: multihead.attention(*inputs, **case["ours"]).sum().backward())

    def sdpa(_: int) -> float:
        return timed(
            lambda: F.scaled_dot_product_attention(*inputs, attn_mask=dense).sum().backward()
        )

    times = interleave({"sdpa": sdpa, "ours": ours}, max(2, args.rounds // 2))
    return {
        "train_sdpa_dense_s": min(t for _, t in times["sdpa"]),
        "train_ours_s": min(t for _, t in times["ours"]),
        "train_ours_over_sdpa_dense": paired_ratio(times["ours"], times["sdpa"]),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    names = [row["case"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(names, [row["ours_over_flex"] for row in rows], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("time of ours / compiled FlexAttention (lower is better)")
    shape = report["shape"]
    ax.set_title(
        f"inference, B={shape['batch']} H={shape['heads']} N={shape['n']} D={shape['head_dim']}, "
        f"{report['threads']} threads"
    )
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--cases", nargs="+", help="only the cases whose name holds a word")
    parser.add_argument("--quick", action="store_true", help="B=1, H=2, N=512: for the tests")
    parser.add_argument("--out", type=Path, default=RESULTS / "flex.json")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.heads, args.n, args.head_dim = 1, 2, 512, 16
        args.window, args.prefix, args.rounds = 64, 128, 2
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    report = run(args)
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()
