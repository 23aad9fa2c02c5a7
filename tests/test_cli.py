"""The `multihead` command: user mistakes give one line and a non-zero exit; the layer demo
agrees with torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from multihead import cli, layer_demo


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multihead.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "painting"), "invalid choice: 'painting'"),
        (("translate", "Hello.", "--model", "/no/such/dir"), "no translation model in"),
        (("translate", "   "), "the sentence is empty"),
        (("show", "/no/such/weights.safetensors"), "error"),
        (("eval", "image"), "eval image"),
        (("eval", "speech", "--model", "/no/such/dir"), "no speech model in"),
        (("demo", "--model", "/no/such/dir"), "no translation model in"),
    ],
)
def test_user_errors_are_one_line_with_nonzero_exit(args, message):
    result = _run(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert message in lines[-1]
    assert len([line for line in lines if "error" in line]) == 1


def test_layer_demo_matches_torch(capsys):
    difference = layer_demo.run(embed_dim=16, num_heads=4)
    out = capsys.readouterr().out
    assert difference < 1e-5
    assert "head 3:" in out and "is_causal fast path" in out


def test_layer_demo_reports_a_bad_head_count():
    assert cli.main(["demo", "layer", "--num-heads", "5"]) == 2
