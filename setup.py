"""Build hook: a wheel carries the shipped models and the data their commands read.

The repository keeps them in ``models/`` and ``data/`` (where ``make train-*`` writes and the
benchmarks read); a non-editable build copies the files below into ``multihead/shipped/``,
where `multihead.apps.shipped` finds them once installed. An editable install reads the
checkout's folders directly. Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# What `multihead demo`, `translate`, `eval` and `show` read, with the licences and
# attribution that must travel with the files (the training logs and curves stay behind).
SHIPPED = [
    "models/README.md",
    "models/translate-en-fr/config.json",
    "models/translate-en-fr/model.safetensors",
    "models/translate-en-fr/spm.model",
    "models/translate-en-fr/results.json",
    "models/image-digits/config.json",
    "models/image-digits/model.safetensors",
    "models/image-digits/results.json",
    "models/speech-digits/config.json",
    "models/speech-digits/model.safetensors",
    "models/speech-digits/results.json",
    # the leave-one-speaker-out runs, for `python -m multihead.apps.speech.loso`
    "models/speech-digits/loso/george/results.json",
    "models/speech-digits/loso/jackson/results.json",
    "data/README.md",
    "data/tatoeba-eng-fra.tsv.gz",
    "data/translate/spm.model",
    "data/fsdd/README.md",
    "data/fsdd/fsdd-digits.flac",
    "data/fsdd/fsdd-digits.tsv",
]


class BuildWithShipped(build_py):
    """build_py, then the shipped files into the package (not for editable installs)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        missing = [name for name in SHIPPED if not (ROOT / name).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot build: shipped files missing: {', '.join(missing)}")
        target = Path(self.build_lib) / "multihead" / "shipped"
        for name in SHIPPED:
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, destination)


setup(cmdclass={"build_py": BuildWithShipped})
