"""GPU benchmark: our attention and layer against torch's, side by side on one CUDA device.

Two groups, each timed forward (inference, no autograd) and forward + backward (gradients of
the inputs, and of the parameters for the layers), in fp16 and bf16, causal and with a
sliding window of 256, at N in 1024, 4096, 16384:

  kernel  (batch 2, 16 heads, head_dim 64): ``multihead.attention`` (kernel "auto"; its choice
          is recorded), torch SDPA (``is_causal=True``, or the window as a dense boolean mask
          built once outside the timing), and the naive formula (softmax(Q Kᵀ/√d) V with the
          N×N matrix, skipped where it would not fit in memory). Baseline: SDPA.
  layer   (batch 2, d_model 1024, 16 heads, same weights): ``multihead.MultiHeadAttention`` and
          ``torch.nn.MultiheadAttention`` (``batch_first=True``, ``need_weights=False``, the
          mask as a dense ``attn_mask``, with ``is_causal`` for the causal one). Baseline: torch.

Contenders run interleaved, one call each per round (the starting contender shifts every
round), timed with CUDA events over enough back-to-back calls to take ~5 ms; the median over
rounds is kept, and ratios are given both as ratio of medians and paired (median over rounds
of time / the baseline's time in that round). Peak memory is of one call, above what the
inputs already hold. A contender that fails (out of memory, or a library path that fails on
this torch) is recorded with its error and the run goes on.

    python benchmarks/bench_gpu.py                 # ~1-2 min on an H100
    python benchmarks/bench_gpu.py --sizes 1024    # a quick look
    python benchmarks/bench_gpu.py --device cpu --sizes 128 256 --out-dir /tmp/try  # the logic

Writes ``results/gpu.json`` and ``results/gpu.png``, and copies both into ``$OUT`` when that
environment variable names a folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import paired_ratio
from torch import Tensor, nn

import multihead
from multihead import masks

BATCH, HEADS, HEAD_DIM = 2, 16, 64
D_MODEL = HEADS * HEAD_DIM
WINDOW = 256
SIZES = (1024, 4096, 16384)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PASSES = ("forward", "forward+backward")
TARGET_MS = 5.0  # each measurement: enough back-to-back calls to take this long
MAX_REPS = 50
RESULTS = Path(__file__).resolve().parent / "results"
KERNEL_BASELINE = "torch SDPA"
LAYER_BASELINE = "torch nn.MultiheadAttention"


# -- timing ----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_ms(run: Callable[[], object], reps: int, device: torch.device) -> float:
    """Mean time of one call over ``reps`` back-to-back calls (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    begin = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - begin) * 1e3 / reps


def peak_mib(run: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call allocates at its peak, above what was allocated before it."""
    if device.type != "cuda":
        run()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def free_bytes(device: torch.device) -> float:
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return float(free)


# -- contenders ------------------------------------------------------------------------------
def naive(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, causal: bool) -> Tensor:
    """The formula as written: the N×N scores, -inf where masked, softmax, weighted sum."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def dense_window(n: int, device: torch.device) -> Tensor:
    """True = may attend: query i sees keys i-WINDOW+1 .. i."""
    i = torch.arange(n, device=device).view(-1, 1)
    j = torch.arange(n, device=device).view(1, -1)
    return (j <= i) & (j > i - WINDOW)


def kernel_contenders(n: int, mask_name: str, dtype: torch.dtype, device: torch.device):
    """name → (function of (q, k, v), bytes it needs beyond the inputs, estimated), explain."""
    causal = mask_name == "causal"
    allowed = None if causal else dense_window(n, device)
    structured = None if causal else masks.sliding_window(n, window=WINDOW)
    ours_kwargs = {"causal": True} if causal else {"mask": structured}
    matrix = BATCH * HEADS * n * n * torch.finfo(dtype).bits // 8
    contenders = {
        "ours: attention (auto)": (
            lambda q, k, v: multihead.attention(q, k, v, **ours_kwargs),
            0,
        ),
        KERNEL_BASELINE: (
            lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, is_causal=causal
            ),
            0,
        ),
        "naive formula": (lambda q, k, v: naive(q, k, v, allowed, causal), 5 * matrix),
    }
    return contenders, ours_kwargs


class LayerPair:
    """Our layer and torch's with the same weights, and how each is called for a mask."""

    def __init__(self, n: int, mask_name: str, dtype: torch.dtype, device: torch.device):
        torch.manual_seed(0)
        self.theirs = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.ours = multihead.MultiHeadAttention(D_MODEL, HEADS)
        with torch.no_grad():
            self.ours.in_proj.weight.copy_(self.theirs.in_proj_weight)
            self.ours.in_proj.bias.copy_(self.theirs.in_proj_bias)
            self.ours.out_proj.load_state_dict(self.theirs.out_proj.state_dict())
        self.theirs.to(device, dtype)
        self.ours.to(device, dtype)
        self.causal = mask_name == "causal"
        if self.causal:
            self.blocked = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
            self.ours_kwargs: dict = {"causal": True}
        else:
            self.blocked = ~dense_window(n, device)
            self.ours_kwargs = {"mask": masks.sliding_window(n, window=WINDOW)}

    def contenders(self):
        return {
            "ours: MultiHeadAttention": (lambda x: self.ours(x, **self.ours_kwargs), 0),
            LAYER_BASELINE: (
                lambda x: self.theirs(
                    x, x, x, attn_mask=self.blocked, is_causal=self.causal, need_weights=False
                )[0],
                0,
            ),
        }

    def parameters(self, name: str) -> list[Tensor]:
        module = self.ours if name.startswith("ours") else self.theirs
        return list(module.parameters())


def make_step(
    fn: Callable[..., Tensor],
    inputs: list[Tensor],
    params: list[Tensor],
    backward: bool,
) -> Callable[[], object]:
    """One call: the forward without autograd, or forward + backward of a fixed cotangent
    (``autograd.grad``: no .grad accumulation to clear between calls)."""
    if not backward:

        def forward() -> object:
            with torch.no_grad():
                return fn(*inputs)

        return forward
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    holder: dict[str, Tensor] = {}

    def train() -> object:
        out = fn(*leaves)
        if "g" not in holder:
            holder["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, leaves + params, holder["g"])

    return train


def time_group(
    steps: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, dict]:
    """Warm up and calibrate each step, then interleaved rounds. Failures are recorded."""
    out: dict[str, dict] = {}
    reps: dict[str, int] = {}
    for name, step in steps.items():
        try:
            step()  # warm-up: kernel choice, allocations
            synchronize(device)
            out[name] = {"peak_mib": peak_mib(step, device)}
            first = elapsed_ms(step, 1, device)
            reps[name] = max(1, min(MAX_REPS, math.ceil(TARGET_MS / max(first, 1e-3))))
            out[name].update({"reps": reps[name], "times_ms": []})
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            out[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            if not isinstance(error, torch.cuda.OutOfMemoryError):
                out[name]["traceback"] = traceback.format_exc(limit=4)[-1500:]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    names = [name for name in steps if name in reps]
    for index in range(rounds):
        shift = index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            try:
                out[name]["times_ms"].append((index, elapsed_ms(steps[name], reps[name], device)))
            except Exception as error:  # noqa: BLE001
                out[name]["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                names.remove(name)
    for entry in out.values():
        times = [t for _, t in entry.get("times_ms", [])]
        entry["median_ms"] = statistics.median(times) if times else None
    return out


def add_ratios(group: dict[str, dict], baseline: str) -> None:
    base = group.get(baseline, {})
    for entry in group.values():
        if entry.get("median_ms") is None or base.get("median_ms") is None:
            entry["ratio_to_baseline"] = entry["paired_ratio_to_baseline"] = None
            continue
        entry["ratio_to_baseline"] = entry["median_ms"] / base["median_ms"]
        entry["paired_ratio_to_baseline"] = paired_ratio(entry["times_ms"], base["times_ms"])
    for entry in group.values():  # round numbers for the JSON
        if entry.get("times_ms"):
            entry["times_ms"] = [round(t, 4) for _, t in entry["times_ms"]]


# -- one configuration -----------------------------------------------------------------------
def run_config(
    group: str, n: int, mask_name: str, dtype_name: str, pass_name: str, rounds: int, device
) -> dict:
    dtype = DTYPES[dtype_name]
    backward = pass_name == "forward+backward"
    gen = torch.Generator(device=device).manual_seed(n)
    record: dict = {"group": group, "n": n, "mask": mask_name, "dtype": dtype_name,
                    "pass": pass_name}  # fmt: skip
    if group == "kernel":
        shape = (BATCH, HEADS, n, HEAD_DIM)
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in "qkv")
        contenders, ours_kwargs = kernel_contenders(n, mask_name, dtype, device)
        record["baseline"] = KERNEL_BASELINE
        inputs, params_of = [q, k, v], (lambda name: [])
        try:  # which kernel ours runs, and the same answer as SDPA's: what is being timed
            record["ours_kernel"] = multihead.explain(q, k, v, **ours_kwargs)
            with torch.no_grad():
                ours = contenders["ours: attention (auto)"][0](q, k, v).float()
                sdpa = contenders[KERNEL_BASELINE][0](q, k, v).float()
            record["ours_vs_sdpa_max_abs_diff"] = float((ours - sdpa).abs().max())
            del ours, sdpa
        except Exception as error:  # noqa: BLE001
            record["ours_vs_sdpa_max_abs_diff"] = f"{type(error).__name__}: {error}"[:300]
    else:
        pair = LayerPair(n, mask_name, dtype, device)
        x = torch.randn(BATCH, n, D_MODEL, generator=gen, device=device, dtype=dtype)
        contenders = pair.contenders()
        for module in (pair.ours, pair.theirs):  # eval: torch's inference fast path may run
            module.train(backward)
        record["baseline"] = LAYER_BASELINE
        inputs, params_of = [x], pair.parameters
    steps, skipped = {}, {}
    for name, (fn, needs) in contenders.items():
        needs = needs * (2 if backward else 1)
        if needs > 0.8 * free_bytes(device):
            skipped[name] = f"skipped: needs ~{needs / 2**30:.1f} GiB beyond the inputs"
            continue
        steps[name] = make_step(fn, inputs, params_of(name) if backward else [], backward)
    timed = time_group(steps, rounds, device)
    timed.update({name: {"error": why, "median_ms": None} for name, why in skipped.items()})
    add_ratios(timed, record["baseline"])
    record["contenders"] = timed
    del steps, contenders
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# -- output ----------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(m, d) for m in ("causal", f"sliding_window({WINDOW})") for d in DTYPES]
    rows = [(g, p) for g in ("kernel", "layer") for p in PASSES]
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(4.2 * len(columns), 3.4 * len(rows)), squeeze=False
    )
    names = sorted({n for rec in results["results"] for n in rec["contenders"]})
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for row, (group, pass_name) in enumerate(rows):
        for col, (mask_name, dtype_name) in enumerate(columns):
            ax = axes[row][col]
            series: dict[str, list[tuple[int, float]]] = {}
            for rec in results["results"]:
                if (rec["group"], rec["mask"], rec["dtype"], rec["pass"]) != (
                    group, mask_name, dtype_name, pass_name,
                ):  # fmt: skip
                    continue
                for name, entry in rec["contenders"].items():
                    if entry.get("median_ms") is not None:
                        series.setdefault(name, []).append((rec["n"], entry["median_ms"]))
            for name, points in sorted(series.items()):
                points.sort()
                style = "-" if name.startswith("ours") else "--"
                ax.plot(
                    *zip(*points, strict=True), style, marker="o", label=name, color=colours[name]
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{group}: {pass_name}, {mask_name}, {dtype_name}", fontsize=9)
            ax.set_xlabel("N (sequence length)")
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
            if col == 0 and series:
                ax.legend(fontsize=7)
    fig.suptitle(
        f"{results['device']} · torch {results['torch']} · kernel: batch {BATCH}, {HEADS} heads, "
        f"head_dim {HEAD_DIM}; layer: d_model {D_MODEL}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_state() -> str | None:
    """The commit the library was run at, "-dirty" when the working tree had changes."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="start no configuration after this"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default results/ (a CUDA --device only)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench_gpu: no CUDA device visible (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda})"
        )
    if device.type != "cuda" and args.out_dir is None:
        raise SystemExit(
            "bench_gpu: with a non-CUDA --device, pass --out-dir (results/ is for GPUs)"
        )
    out_dir = args.out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    results: dict = {
        "benchmark": "bench_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "capability": list(torch.cuda.get_device_capability(device))
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "multihead": multihead.__version__,
        "git": git_state(),
        "shapes": {
            "kernel": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM},
            "layer": {"batch": BATCH, "d_model": D_MODEL, "heads": HEADS},
            "window": WINDOW,
        },  # fmt: skip
        "rounds": args.rounds,
        "timing": f"CUDA events over back-to-back calls of ~{TARGET_MS} ms, median over "
        "interleaved rounds"
        if device.type == "cuda"
        else "perf_counter (not a GPU run)",
        "results": [],
        "not_run": [],
    }
    print(f"bench_gpu on {name}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    configs = [
        (group, n, mask_name, dtype_name, pass_name)
        for n in sorted(args.sizes)
        for mask_name in ("causal", f"sliding_window({WINDOW})")
        for dtype_name in args.dtypes
        for pass_name in PASSES
        for group in ("kernel", "layer")
    ]
    for config in configs:
        if time.perf_counter() - began > args.budget_s:
            results["not_run"].append(dict(zip(("group", "n", "mask", "dtype", "pass"), config,
                                               strict=True)))  # fmt: skip
            continue
        record = run_config(*config, args.rounds, device)
        results["results"].append(record)
        line = ", ".join(
            f"{k}: {v['median_ms']:.3f} ms" if v.get("median_ms") is not None else f"{k}: -"
            for k, v in record["contenders"].items()
        )
        print(f"{config[0]:6} N={config[1]:5} {config[2]:18} {config[3]} {config[4]:16} {line}",
              flush=True)  # fmt: skip
        for k, v in record["contenders"].items():
            if v.get("error") and not str(v["error"]).startswith("skipped"):
                print(f"    FAILED {k}: {v['error']}", flush=True)
    results["seconds"] = round(time.perf_counter() - began, 1)
    if results["not_run"]:
        print(f"time budget of {args.budget_s:.0f} s spent: {len(results['not_run'])} not run")

    json_path, png_path = out_dir / "gpu.json", out_dir / "gpu.png"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path} ({results['seconds']} s)")
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"])
        target.mkdir(parents=True, exist_ok=True)
        for path in (json_path, png_path):
            shutil.copy(path, target / path.name)
        print(f"copied both to {target}")


if __name__ == "__main__":
    main()
