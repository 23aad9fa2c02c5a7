"""The wheel works on its own: built from a copy of the working tree, installed into a fresh
virtual environment, and run from an unrelated directory, `multihead` finds the shipped models
and data inside the installed package.

No network: the wheel is built without build isolation (this environment's setuptools), and
the fresh environment gets no packages of its own beyond the wheel; torch and the other
dependencies are read from this environment's site-packages through a ``.pth`` line, which
(unlike a site directory) does not run this checkout's editable-install hook. About a minute;
marked ``wheel`` (``-m "not wheel"`` leaves it out locally; CI runs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREE = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src", "models", "data"]
MAX_WHEEL_MB = 40

pytestmark = pytest.mark.wheel


def _copy_tree(target: Path) -> None:
    """What a fresh clone holds for the build (no build/, egg-info or caches)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "splits")
    target.mkdir()
    for name in TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=skip)
        else:
            shutil.copy2(source, target / name)


def _run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None, stdin: str = ""):
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{argv}: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel installed into a fresh venv: (its bin folder, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    _copy_tree(tmp / "tree")
    pip = [sys.executable, "-m", "pip"]
    _run(*pip, "wheel", tmp / "tree", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
         "-q", cwd=tmp)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("multihead-*.whl")
    print(f"wheel: {wheel.name}, {wheel.stat().st_size / 1e6:.1f} MB")
    _run(sys.executable, "-m", "venv", "--without-pip", tmp / "venv", cwd=tmp)
    venv_python = tmp / "venv" / "bin" / "python"
    _run(*pip, "--python", venv_python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp)
    site = _run(venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                cwd=tmp).strip()  # fmt: skip
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MULTIHEAD_", "PYTHON"))}
    env["OMP_NUM_THREADS"] = "1"
    (tmp / "elsewhere").mkdir()
    return tmp / "venv" / "bin", env


def test_the_wheel_holds_the_shipped_models_and_data(installed):
    bin_dir, _ = installed
    (wheel,) = (bin_dir.parents[1] / "dist").glob("multihead-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("translate-en-fr", "image-digits", "speech-digits"):
        assert f"multihead/shipped/models/{model}/model.safetensors" in names
    assert "multihead/shipped/data/fsdd/README.md" in names
    assert wheel.stat().st_size < MAX_WHEEL_MB * 1e6


def test_the_installed_command_runs_from_any_directory(installed):
    bin_dir, env = installed
    cwd = bin_dir.parents[1] / "elsewhere"
    multihead = bin_dir / "multihead"
    where = _run(bin_dir / "python", "-c", "import multihead; print(multihead.__file__)",
                 cwd=cwd, env=env)  # fmt: skip
    assert Path(where.strip()).is_relative_to(bin_dir.parent)
    assert _run(multihead, "--version", cwd=cwd, env=env).strip().startswith("multihead ")
    out = _run(multihead, "eval", "image", cwd=cwd, env=env)
    assert "multihead/shipped/models/image-digits" in out and "/360 images)" in out
    out = _run(
        multihead, "translate", "--beam", "1", cwd=cwd, env=env, stdin="Where is the station?\n"
    )
    assert "gare" in out
    out = _run(multihead, "eval", "translate", "--sentences", "5", "--beam", "1", cwd=cwd, env=env)
    assert "on 5 sentences" in out
    out = _run(multihead, "eval", "speech", "--utterances", "4", "--beam", "2", cwd=cwd, env=env)
    assert out.count("(4 utterances)") == 2
    out = _run(multihead, "show", "image", "3", "--out", "shown", cwd=cwd, env=env)
    assert (cwd / "shown" / "image-3.html").is_file()
    out = _run(multihead, "demo", "--sentences", "3", "--beam", "1", "--out", "demo", cwd=cwd,
               env=env)  # fmt: skip
    assert "on 3 sentences" in out and (cwd / "demo" / "alignment.png").is_file()
