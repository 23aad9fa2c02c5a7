"""Leave-one-speaker-out: how the speech recipe does on voices it never heard.

Each run of `make train-speech-loso` trains the shipped recipe with one more FSDD speaker held
out (``--unseen-speaker``) and keeps its ``results.json`` and training log under
``models/speech-digits/loso/SPEAKER/``; the shipped model itself is the run that holds out
lucas. ``python -m multihead.apps.speech.loso`` gathers them into one table with the mean and
the worst unseen-speaker WER.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..shipped import shipped_model

__all__ = ["gather", "main", "summary", "table"]

KEYS = ("test_wer_greedy", "unseen_wer_greedy", "test_wer_beam8", "unseen_wer_beam8")


def gather(root: Path | str) -> dict[str, dict[str, float]]:
    """Per held-out speaker: updates, minutes and WERs, from ``root/results.json`` and
    ``root/loso/*/results.json``."""
    root = Path(root)
    paths = [root / "results.json", *sorted((root / "loso").glob("*/results.json"))]
    runs: dict[str, dict[str, float]] = {}
    for path in paths:
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        speaker = str(results["args"]["unseen_speaker"])
        if speaker in runs:
            raise ValueError(f"{path}: a second run holding out {speaker}")
        runs[speaker] = {
            "steps": results["steps"],
            "minutes": round(results["train_seconds"] / 60, 1),
            **{k: results[k] for k in KEYS if k in results},
        }
    return runs


def summary(runs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and worst (highest) of each WER over the held-out speakers."""
    out: dict[str, dict[str, float]] = {"mean": {}, "worst": {}}
    for key in KEYS:
        values = [run[key] for run in runs.values() if key in run]
        if values:
            out["mean"][key] = round(sum(values) / len(values), 2)
            out["worst"][key] = max(values)
    return out


def table(runs: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per held-out speaker, then the mean and the worst."""
    lines = [
        "| held-out speaker | updates | minutes | test recordings, greedy / beam 8 "
        "| unseen speaker, greedy / beam 8 |",
        "|---|---|---|---|---|",
    ]

    def pair(row: dict[str, float], name: str) -> str:
        keys = (f"{name}_greedy", f"{name}_beam8")
        return " / ".join(f"{row[k]:.2f} %" for k in keys if k in row)

    for speaker, run in runs.items():
        lines.append(
            f"| {speaker} | {run['steps']:,} | {run['minutes']} | {pair(run, 'test_wer')} "
            f"| {pair(run, 'unseen_wer')} |"
        )
    for name, row in summary(runs).items():
        lines.append(f"| **{name}** | | | {pair(row, 'test_wer')} | {pair(row, 'unseen_wer')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", help="the shipped speech model's folder (default)")
    parser.add_argument("--json", action="store_true", help="the runs and summary as JSON")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else shipped_model("speech-digits")
    runs = gather(root)
    if not runs:
        parser.error(f"no results.json under {root}")
    if args.json:
        print(json.dumps({"runs": runs, **summary(runs)}, indent=2))
    else:
        print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
