"""Data-parallel training: two processes against one, on the image app as shipped.

    python benchmarks/bench_ddp.py            # → results/ddp.json
    python benchmarks/bench_ddp.py --quick    # smoke test (tiny model, few steps)

1. Agreement. ``multihead train image`` for 100 updates in one process and under
   ``torchrun --nproc-per-node 2`` (each process takes half of every global batch of 64), at
   a tiny size and at the default size, float32, one thread per process: the largest relative
   difference of the logged train losses (steps 25…100) and of the test loss at step 100.
   With the same batches the only difference is the order in which gradient sums are added.
2. Throughput. The default model for ``--steps`` updates: one process with 2 threads against
   two processes with 1 thread each, run one after the other; updates per second over the
   logged stretch (startup excluded).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_common import cpu_model, load_average

from multihead.training import read_log

RESULTS = Path(__file__).resolve().parent / "results"
TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--ff", "32", "--warmup", "10"]


def train(
    out: Path, name: str, processes: int, threads: int, steps: int, *extra: str, evals: int = 2
) -> Path:
    """One ``multihead train image`` run with ``evals`` evaluations; returns its log."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    argv = [
        *("-m", "multihead.cli", "train", "image", "--steps", str(steps), "--minutes", "60"),
        *("--eval-every", str(max(steps // evals, 1)), "--threads", str(threads), "--no-progress"),
        *("--run-dir", str(out / name), "--model-dir", str(out / name / "model"), "--overwrite"),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([*launch, *argv], cwd=out, env=env, check=True, capture_output=True)
    return out / name / "log.jsonl"


def relative(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((x - y).abs().max() / y.abs().max())


def agreement(out: Path, size: str, steps: int) -> dict[str, Any]:
    extra = TINY if size == "tiny" else []
    logs = [read_log(train(out, f"{size}-{n}", n, 1, steps, *extra)) for n in (1, 2)]
    series = {
        key: [[r[key] for r in log if r["kind"] == kind] for log in logs]
        for kind, key in (("train", "loss"), ("eval", "test_loss"))
    }
    return {
        "size": size,
        "steps": steps,
        "train_loss_one": series["loss"][0],
        "train_loss_two": series["loss"][1],
        "train_loss_relative": relative(series["loss"][1], series["loss"][0]),
        "test_loss_relative": relative(series["test_loss"][1], series["test_loss"][0]),
    }


def updates_per_second(log: Path) -> float:
    train_records = [r for r in read_log(log) if r["kind"] == "train"]
    first, last = train_records[0], train_records[-1]
    return (last["step"] - first["step"]) / (last["elapsed"] - first["elapsed"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=1000, help="updates of the throughput runs")
    parser.add_argument("--out", type=Path, help="output file (default results/ddp[_quick].json)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    steps = 50 if args.quick else args.steps  # the app logs every 25 updates
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sizes = ("tiny",) if args.quick else ("tiny", "default")
        agreements = [agreement(out, size, 50 if args.quick else 100) for size in sizes]
        extra = TINY if args.quick else []  # n processes of 2 // n threads each
        one, two = (
            updates_per_second(train(out, f"speed-{n}", n, 2 // n, steps, *extra, evals=1))
            for n in (1, 2)
        )
    payload = {
        "meta": {
            "benchmark": "ddp",
            "date": started.isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average_end": load_average(),
            "quick": args.quick,
            "command": "python benchmarks/bench_ddp.py" + (" --quick" if args.quick else ""),
        },
        "agreement": agreements,
        "throughput": {
            "steps": steps,
            "one_process_2_threads_updates_per_s": one,
            "two_processes_1_thread_updates_per_s": two,
        },
    }
    path = args.out or RESULTS / ("ddp_quick.json" if args.quick else "ddp.json")
    path.write_text(json.dumps(payload, indent=2) + "\n")
    for row in agreements:
        print(
            f"{row['size']}: train loss relative {row['train_loss_relative']:.1e}, "
            f"test loss {row['test_loss_relative']:.1e} after {row['steps']} updates"
        )
    print(f"updates/s: one process {one:.1f}, two processes {two:.1f}; wrote {path}")


if __name__ == "__main__":
    main()
