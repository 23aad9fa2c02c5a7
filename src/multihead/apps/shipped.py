"""Where the shipped models and the data the applications read are found.

Independent of the current directory, in this order:

1. ``$MULTIHEAD_MODELS`` / ``$MULTIHEAD_DATA``, when set: a folder laid out as the
   repository's ``models/`` (``translate-en-fr/``, ``image-digits/``, ``speech-digits/``) or
   ``data/`` (``tatoeba-eng-fra.tsv.gz``, ``translate/spm.model``, ``fsdd/``);
2. inside the installed package, ``multihead/shipped/models`` and ``multihead/shipped/data``
   (a wheel carries them: ``setup.py`` copies them in at build time);
3. the source checkout this package runs from: ``models/`` and ``data/`` beside ``src/``
   (an editable install, or ``PYTHONPATH=src``), where ``make train-*`` writes.

A command's ``--model DIR`` overrides all of them for the model.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DATA_VARIABLE",
    "MODELS_VARIABLE",
    "data_dir",
    "data_file",
    "models_dir",
    "shipped_model",
]

MODELS_VARIABLE = "MULTIHEAD_MODELS"
DATA_VARIABLE = "MULTIHEAD_DATA"

_PACKAGE = Path(__file__).resolve().parents[1]  # .../multihead
_INSTALLED = _PACKAGE / "shipped"
_CHECKOUT = _PACKAGE.parents[1]  # the repository root when the package is src/multihead


def _in_checkout() -> bool:
    return _PACKAGE.parent.name == "src" and (_CHECKOUT / "pyproject.toml").is_file()


def _root(variable: str, name: str) -> Path:
    value = os.environ.get(variable, "").strip()
    if value:
        return Path(value).expanduser()
    if (_INSTALLED / name).is_dir():
        return _INSTALLED / name
    if _in_checkout() and (_CHECKOUT / name).is_dir():
        return _CHECKOUT / name
    # Nothing shipped here (a wheel built without them): errors name the installed place.
    return _INSTALLED / name


def models_dir() -> Path:
    """The folder holding the shipped models, one subfolder each."""
    return _root(MODELS_VARIABLE, "models")


def data_dir() -> Path:
    """The folder holding the shipped data (Tatoeba pairs, the tokenizer, FSDD)."""
    return _root(DATA_VARIABLE, "data")


def shipped_model(name: str) -> Path:
    """The folder of the shipped model ``name`` (``translate-en-fr``, ``image-digits``,
    ``speech-digits``)."""
    return models_dir() / name


def data_file(*parts: str) -> Path:
    """A path inside the shipped data folder."""
    return data_dir().joinpath(*parts)
