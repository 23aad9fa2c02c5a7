"""The run's metrics: one JSON object per line in ``log.jsonl``, and a PNG of the curves.

JSON Lines because a run may be killed at any moment: every line written is complete and
readable, and a resumed run drops the lines past its checkpoint and appends from there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write

__all__ = ["MetricsLog", "plot_curves", "publish_run", "read_log"]


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a JSONL log (an empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class MetricsLog:
    """Append-only JSONL log; each record has a ``kind`` ("train" or "eval") and a ``step``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def reset(self, keep_until_step: int | None = None) -> None:
        """Start afresh, or keep only the records up to ``keep_until_step`` (for a resume)."""
        kept = []
        if keep_until_step is not None:
            kept = [r for r in read_log(self.path) if r["step"] <= keep_until_step]
        text = "".join(json.dumps(record) + "\n" for record in kept)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record, ``{"kind": kind, "step": step, **values}``, and return it."""
        record = {"kind": kind, "step": step, **values}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return record


def plot_curves(log_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> Path:
    """Plot training loss, learning rate and every eval metric against the step."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(log_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    eval_keys = sorted(
        {k for r in evals for k, v in r.items() if k not in ("kind", "step", "epoch")} - {"elapsed"}
    )
    panels: list[tuple[str, list[dict[str, Any]], str]] = [("loss", train, "train")]
    panels += [(key, evals, "eval") for key in eval_keys]
    panels.append(("lr", train, "train"))

    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (key, source, kind) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        points = [(r["step"], r[key]) for r in source if isinstance(r.get(key), int | float)]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if kind == "eval" else None, markersize=3)
        axes.set_title(f"{kind} {key}")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    png_path = Path(png_path)
    figure.savefig(png_path, dpi=100)
    return png_path


def publish_run(
    run_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str], results: Mapping[str, Any]
) -> Path:
    """Put a run's evidence beside its model: ``results.json`` (the figures), and the run's
    ``log.jsonl`` and ``curves.png`` as ``train_log.jsonl`` and ``curves.png``, so that every
    figure said of a model can be checked against files that travel with it."""
    run_dir, model_dir = Path(run_dir), Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for source, target in (("log.jsonl", "train_log.jsonl"), ("curves.png", "curves.png")):
        if (run_dir / source).exists():
            shutil.copyfile(run_dir / source, model_dir / target)
    return model_dir / "results.json"
