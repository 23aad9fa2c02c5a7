"""Each application's recipe, run again with its attention built from `torch.nn`.

    python benchmarks/contenders.py image [RECIPE ARGS]       # make contender-image
    python benchmarks/contenders.py speech [RECIPE ARGS]      # make contender-speech
    python benchmarks/contenders.py translate [RECIPE ARGS]   # make contender-translate

The contender is the model the README compares ours with: the same training script, data
split, time budget, schedule, augmentation, weight averaging, decoding and metric as our
recipe (the Makefile passes the recipe's own arguments), and the same initial weights; only the
attention stack differs: `torch.nn.TransformerEncoder` in the ViT and the speech encoder,
`torch.nn.Transformer` in the translator, which decodes without a key/value cache because
torch's module has none (`torch_twins.py`). What each reaches in the same minutes is then the
library's doing.

The run goes to ``runs/contender-TASK/``; its ``results.json``, ``train_log.jsonl`` and
``curves.png`` are copied to ``benchmarks/results/contender-TASK/`` (``--out`` elsewhere).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from torch_twins import torch_seq2seq, torch_speech_encoder, torch_vit

from multihead.apps import image
from multihead.apps.speech import train as speech_train
from multihead.apps.translate import train as translate_train

RESULTS = Path(__file__).resolve().parent / "results"
EVIDENCE = ("results.json", "train_log.jsonl", "curves.png")


def run_image(recipe: list[str], run_dir: Path) -> Path:
    image.main(
        [*recipe, "--run-dir", str(run_dir), "--model-dir", str(run_dir / "model"), "--overwrite"],
        build_model=torch_vit,
    )
    return run_dir / "model"


def run_speech(recipe: list[str], run_dir: Path) -> Path:
    speech_train.main(
        [*recipe, "--run-dir", str(run_dir), "--overwrite"], build_model=torch_speech_encoder
    )
    return run_dir / "model"


def run_translate(recipe: list[str], run_dir: Path) -> Path:
    translate_train.main(
        [*recipe, "--run-dir", str(run_dir), "--model-dir", str(run_dir / "model"), "--overwrite"],
        build_model=torch_seq2seq,
    )
    return run_dir / "model"


TASKS: dict[str, Callable[[list[str], Path], Path]] = {
    "image": run_image,
    "speech": run_speech,
    "translate": run_translate,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments go to the task's training script, as in our recipe.",
    )
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--out", type=Path, help="where the evidence goes")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="parent of the run dir")
    args, recipe = parser.parse_known_args(argv)
    model_dir = TASKS[args.task](recipe, args.runs / f"contender-{args.task}")
    out = args.out or RESULTS / f"contender-{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    for name in EVIDENCE:
        if (model_dir / name).exists():
            shutil.copyfile(model_dir / name, out / name)
    print(f"contender's results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
