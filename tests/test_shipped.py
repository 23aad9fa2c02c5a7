"""The shipped models and data are found wherever a command runs: $MULTIHEAD_MODELS and
$MULTIHEAD_DATA first, then the installed package, then the source checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multihead.apps import shipped

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODELS = ("translate-en-fr", "image-digits", "speech-digits")


def _setup_py_shipped() -> list[str]:
    """The SHIPPED list of setup.py, read without running the build."""
    namespace: dict[str, object] = {}
    source = (ROOT / "setup.py").read_text(encoding="utf-8")
    start = source.index("SHIPPED = [")
    exec(source[start : source.index("]", start) + 1], namespace)
    return list(namespace["SHIPPED"])  # type: ignore[arg-type]


def test_a_checkout_finds_its_models_and_data(monkeypatch):
    for variable in (shipped.MODELS_VARIABLE, shipped.DATA_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    assert shipped.models_dir() == ROOT / "models"
    assert shipped.data_dir() == ROOT / "data"
    for name in SHIPPED_MODELS:
        assert (shipped.shipped_model(name) / "config.json").is_file()


def test_the_variables_point_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv(shipped.MODELS_VARIABLE, str(tmp_path / "m"))
    monkeypatch.setenv(shipped.DATA_VARIABLE, str(tmp_path / "d"))
    assert shipped.shipped_model("image-digits") == tmp_path / "m" / "image-digits"
    assert shipped.data_file("fsdd") == tmp_path / "d" / "fsdd"


def test_the_wheel_carries_what_the_commands_read_with_the_licences():
    files = _setup_py_shipped()
    assert all((ROOT / name).is_file() for name in files)
    for name in SHIPPED_MODELS:
        assert {f"models/{name}/config.json", f"models/{name}/model.safetensors"} <= set(files)
    assert {"models/README.md", "data/README.md", "data/fsdd/README.md"} <= set(files)
    assert {"data/tatoeba-eng-fra.tsv.gz", "data/translate/spm.model"} <= set(files)


def _multihead(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str = ""):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MULTIHEAD_")}
    return subprocess.run(
        [sys.executable, "-m", "multihead.cli", *args],
        cwd=cwd,
        env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_commands_work_from_any_directory(tmp_path):
    result = _multihead("translate", "--beam", "1", cwd=tmp_path, stdin="Where is the station?\n")
    assert result.returncode == 0, result.stderr
    assert "gare" in result.stdout
    result = _multihead("eval", "image", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"model: {ROOT / 'models' / 'image-digits'}" in result.stdout
    assert "/360 images)" in result.stdout


def test_model_and_variable_override_the_shipped_model(tmp_path):
    mine = tmp_path / "mine"
    shutil.copytree(ROOT / "models" / "image-digits", mine, ignore=shutil.ignore_patterns("splits"))
    result = _multihead("eval", "image", "--model", str(mine), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"model: {mine}" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _multihead("eval", "image", cwd=tmp_path, env={"MULTIHEAD_MODELS": str(empty)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"multihead eval: error: no image model in {empty / 'image-digits'}/ (config.json missing)"
    )


@pytest.mark.parametrize("argv", [["eval", "translate", "--sentences", "3"], ["eval", "speech"]])
def test_missing_data_is_one_line_naming_the_variable(argv, tmp_path):
    result = _multihead(*argv, cwd=tmp_path, env={"MULTIHEAD_DATA": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "MULTIHEAD_DATA" in lines[0]
