"""benchmarks/bench_flex.py, bench_score_mods.py and bench_compile.py in their quick form:
they run, write what the README reads, and our outputs equal the contender's (FlexAttention
compiled; the dense ALiBi bias; a compiled hand-written layer). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, out: Path, *extra: str) -> dict:
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


def test_flex_quick_agrees_with_compiled_flex_attention(tmp_path: Path) -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    report = run(
        "bench_flex.py", tmp_path / "flex.json", "--no-train", "--cases", "window", "ALiBi"
    )
    names = [row["case"] for row in report["results"]]
    assert len(names) == 2 and "window" in names[0] and "ALiBi" in names[1]
    for row in report["results"]:
        assert row["max_abs_difference"] < 1e-4  # the same attention as Flex computes
        assert row["flex_s"] > 0 and row["ours_s"] > 0 and row["ours_over_flex"] > 0
    assert all(row["explain"].split(":")[0] in ("sdpa", "tiled") for row in report["results"])
    assert report["shape"]["n"] == 512 and report["ratio"].startswith("paired")


def test_score_mods_quick_agrees_with_the_dense_bias(tmp_path: Path) -> None:
    report = run("bench_score_mods.py", tmp_path / "score_mods.json")
    assert report["max_abs_difference"] < 1e-5
    kinds = {(point["kind"], point["n"]) for point in report["points"]}
    assert kinds == {(kind, n) for kind in ("score_mod", "dense_bias") for n in (256, 512)}
    assert all(point["peak_bytes"] > 0 for point in report["points"])


def test_compile_quick_compares_the_same_layer(tmp_path: Path) -> None:
    """bench_compile: our compiled layer and the compiled hand-written one hold the same
    weights and give the same output; both compile (forward, backward, inference)."""
    report = run("bench_compile.py", tmp_path / "compile.json")
    assert report["max_abs_difference"] < 1e-5
    assert set(report["results"]) == {"forward", "forward_backward"}
    assert all(row["ours_over_hand_written"] > 0 for row in report["results"].values())
    assert set(report["compile_s"]) == {"ours", "hand_written"}
    assert report["lm_training"]["compiled_over_eager"] > 0
