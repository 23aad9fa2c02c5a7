"""What the benchmarks share: the machine they ran on, and interleaved timing.

Imported by name (``from bench_common import ...``): a script run as
``python benchmarks/bench_x.py`` has this folder first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "cpu_model",
    "interleave",
    "load_average",
    "paired_ratio",
    "proc_status",
    "timed",
    "write_report",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def proc_status(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    steps: dict[str, Callable[[int], float]], rounds: int, repeats: dict[str, int] | None = None
) -> dict[str, list[tuple[int, float]]]:
    """Call each step once per round, starting one contender later each round.

    ``steps[key](round)`` returns its wall time. A contender with fewer ``repeats`` than
    there are rounds has its calls spread evenly over them, so all share the same stretch
    of time (the machine's load drifts; paired ratios compare neighbouring rounds).
    """
    keys = list(steps)
    repeats = repeats or {}
    times: dict[str, list[tuple[int, float]]] = {key: [] for key in keys}
    for index in range(rounds):
        shift = index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            n = repeats.get(key, rounds)
            if (index + 1) * n // rounds > index * n // rounds:
                times[key].append((index, steps[key](index)))
    return times


def paired_ratio(times: list[tuple[int, float]], base: list[tuple[int, float]]) -> float:
    """Median over rounds of time / the baseline's time in the nearest round."""
    ratios = []
    for index, elapsed in times:
        nearest = min(base, key=lambda item: abs(item[0] - index))
        ratios.append(elapsed / nearest[1])
    return statistics.median(ratios)


def write_report(report: dict, out: Path, plot: Callable[[dict, Path], None]) -> None:
    """``report`` as JSON at ``out`` and its plot beside it (same name, .png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
