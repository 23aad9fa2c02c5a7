"""Fuzzing the `multihead` command: whatever the arguments and standard input, it ends with
exit status 0, 1 or 2, and a failure is one error line, never a traceback.

The argument fuzz replaces the long-running work behind valid commands (training, scoring
whole test sets, the benchmark) with stubs, so every example checks parsing and validation;
the standard-input fuzz translates with the shipped model.
"""

from __future__ import annotations

import functools
import io
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multihead import cli
from multihead.apps import show
from multihead.apps.translate import demo
from multihead.apps.translate import evaluate as translate_evaluate
from multihead.kernels import online_softmax

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

NUMBERS = st.sampled_from(
    ["0", "1", "2", "-1", "5", "64", "65", "360", "5001", "262144", "262145", "1e3", "x", ""]
) | st.integers(-(10**30), 10**30).map(str)
WORDS = st.sampled_from(
    ["Hello.", "   ", "image", "translation", "speech", "translate", "layer", "/no/such",
     "causal", "window:16", "padding:3,9", "documents:4,4", "causal&window:2", "none", "\udcff",
     "-", "--", "-h"]
) | st.text(max_size=12)  # fmt: skip
FLAGS = {
    "demo": ["--model", "--out", "--sentences", "--beam", "--embed-dim", "--num-heads", "--seed"],
    "train": ["--minutes", "--steps", "--lr", "--d-model", "--heads", "--resume", "--help"],
    "eval": ["--model", "--sentences", "--utterances", "--beam"],
    "translate": ["--model", "--beam", "--show", "--out"],
    "show": ["--model", "--tokenizer", "--out", "--layer", "--beam"],
    "explain": ["--batch", "--heads", "--kv-heads", "--q-len", "--k-len", "--head-dim", "--mask",
                "--dtype", "--kernel", "--weights", "--device"],
    "bench": ["--quick", "--sizes", "--seconds", "--threads"],
}  # fmt: skip


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from([*FLAGS, "frobnicate", "--version", "--help"]))
    argv = [command]
    if command == "train":
        argv.append(draw(st.sampled_from(["image", "speech", "translate", "painting"])))
    elif command in ("eval", "show", "demo"):
        argv.append(draw(st.sampled_from(["translate", "image", "speech", "translation", "layer"])))
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from(FLAGS.get(command, ["--x"])))
        argv += [flag, draw(NUMBERS | WORDS)]
    if draw(st.booleans()):
        argv.append(draw(WORDS | NUMBERS))
    return argv


@pytest.fixture
def stubs(monkeypatch, tmp_path):
    """Quick stand-ins for the work behind valid commands; parsing and checks stay real."""
    monkeypatch.chdir(tmp_path)  # anything written goes to the test's folder
    monkeypatch.setattr(online_softmax, "BLOCK_Q", 256)  # explain's real tiles
    monkeypatch.setattr(online_softmax, "BLOCK_K", 128)

    load_app = cli.train.load_app

    def train_app(task):
        app = load_app(task)

        def main(options, prog):
            args = app.build_parser(prog).parse_args(options)
            return 0 if args else 1

        return SimpleNamespace(main=main)

    monkeypatch.setattr(cli.train, "load_app", train_app)
    for task in ("_translate", "_image", "_speech"):
        monkeypatch.setattr(cli.evaluate, task, lambda directory, args: None)
    monkeypatch.setattr(cli.bench, "run_quick", lambda sizes, seconds, threads: [])
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: {})
    monkeypatch.setattr(demo, "load", functools.cache(demo.load))
    monkeypatch.setattr(show, "show_translation", lambda sentence, args: [])
    monkeypatch.setattr(show, "show_image", lambda index, args: [])
    monkeypatch.setattr(
        translate_evaluate, "translate", lambda model, sp, sentences, **kw: ["x"] * len(sentences)
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello.\n\xff\n")))


def _status(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit:  # argparse: --help, --version, or a usage error
        return 0 if exit.code is None else int(exit.code)


@FUZZ
@given(argv=argvs())
def test_any_arguments_end_in_a_status_and_at_most_one_error_line(argv, stubs, capsys):
    capsys.readouterr()
    sys.stdin.seek(0)
    status = _status(argv)
    err = capsys.readouterr().err
    assert status in (0, 1, 2), (argv, status, err)
    assert "Traceback" not in err, (argv, err)
    errors = [line for line in err.splitlines() if "error:" in line]
    if status == 2:
        assert len(errors) == 1, (argv, err)
    elif status == 1:  # translate: one line per undecodable input line
        assert argv[0] == "translate" and errors, (argv, err)


@pytest.fixture(scope="module")
def shipped_translation():
    return functools.cache(demo.load)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    lines=st.lists(
        st.binary(max_size=30) | st.text(max_size=20).map(lambda t: t.encode("utf-8", "replace")),
        max_size=4,
    )
)
def test_any_standard_input_translates_line_for_line(lines, shipped_translation, capsys):
    lines = [line.replace(b"\n", b" ") for line in lines]
    data = b"".join(line + b"\n" for line in lines)
    bad = []
    for number, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "load", shipped_translation)
        patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        status = cli.main(["translate", "--beam", "1"])
    out, err = capsys.readouterr()
    assert status == (1 if bad else 0)
    assert "Traceback" not in err
    assert [int(line.split()[4]) for line in err.splitlines()] == bad
    if lines:
        produced = out.split("\n")[:-1]
        assert len(produced) == len(lines)
        for number, (line, french) in enumerate(zip(lines, produced, strict=True), 1):
            if number in bad or not line.decode("utf-8").strip():
                assert french == ""
    else:
        assert out == ""
