"""benchmarks/bench_scale.py in its quick form: the ragged part runs, its contenders agree,
and the JSON and PNG it writes carry the targets (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def test_quick_ragged_part_writes_results(tmp_path: Path) -> None:
    stem = tmp_path / "scale"
    command = [sys.executable, str(BENCH), "--quick", "--parts", "ragged", "--out", str(stem)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    payload = json.loads(stem.with_suffix(".json").read_text())
    ragged = payload["parts"]["ragged"]
    # The packed layer equals torch's padded one (the script refuses to time otherwise).
    assert ragged["layer_deviation"] < 1e-4 and ragged["core_deviation"] < 1e-4
    assert ragged["total_tokens"] == sum(ragged["lengths"]) < ragged["padded_tokens"]
    assert [row["sequences"] for row in ragged["paths"]] == [64, 32]
    for row in ragged["paths"]:
        for mode in ("forward", "train"):
            assert row[mode]["packed_over_per_sequence"] > 0
    assert any(t["target"].startswith("ragged") for t in payload["targets"])
    assert stem.with_suffix(".png").stat().st_size > 0
