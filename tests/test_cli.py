"""The `multihead` command: user mistakes give one line and a non-zero exit; the layer demo
agrees with torch."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest
import torch

import multihead
from multihead import cli, layer_demo, masks
from multihead.apps import limits
from multihead.apps.shipped import shipped_model
from multihead.cli import bench, train


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
        (("eval", "image", "--beam", "3"), "takes no --beam"),
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


# -- one consistent CLI ------------------------------------------------------------------------


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return int(info.value.code or 0)


def test_version_is_the_package_version(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"multihead {multihead.__version__}"
    assert multihead.__version__ == importlib.metadata.version("multihead")


def test_train_help_lists_the_tasks(capsys):
    assert _exit_code(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: multihead train")
    assert all(f"  {task} " in out for task in train.TASKS)


@pytest.mark.parametrize("task", sorted(train.TASKS))
def test_train_task_help_shows_its_own_usage(task, capsys):
    assert _exit_code(["train", task, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: multihead train {task} ")
    assert "--minutes" in out and "python -m" not in out


def test_train_task_errors_name_the_command(capsys):
    assert _exit_code(["train", "image", "--minutes", "soon"]) == 2
    err = capsys.readouterr().err
    assert "multihead train image: error: argument --minutes" in err


def test_eval_image_scores_the_shipped_model_on_its_test_split(capsys):
    assert cli.main(["eval", "image"]) == 0
    out = capsys.readouterr().out
    results = json.loads((shipped_model("image-digits") / "results.json").read_text())
    right = round(results["vit_test_accuracy"] * results["test_images"])
    assert f"test: accuracy {100 * right / 360:.2f} % ({right}/360 images)" in out
    assert "with test-time shifts" in out


def test_eval_translate_prints_bleu_with_the_number_of_sentences(capsys):
    assert cli.main(["eval", "translate", "--sentences", "8", "--beam", "1"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("test: BLEU ") and "chrF" in line and "on 8 sentences" in line


def test_eval_speech_prints_wer_with_the_number_of_utterances(capsys):
    pytest.importorskip("soundfile")
    assert cli.main(["eval", "speech", "--utterances", "6", "--beam", "2"]) == 0
    out = capsys.readouterr().out
    assert "test recordings: WER" in out and "unseen speaker: WER" in out
    assert out.count("(6 utterances)") == 2


@pytest.fixture
def real_tiles(monkeypatch):
    """The kernel's own tile sizes: explain reports what a real call computes."""
    from multihead.kernels import online_softmax

    monkeypatch.setattr(online_softmax, "BLOCK_Q", 256)
    monkeypatch.setattr(online_softmax, "BLOCK_K", 128)


@pytest.mark.parametrize(
    ("spec", "mask"),
    [
        ("none", None),
        ("causal", masks.causal(2048)),
        ("window:256", masks.sliding_window(2048, window=256)),
        (
            "causal&documents:1000,1048",
            masks.causal(2048) & masks.documents([0] * 1000 + [1] * 1048),
        ),
    ],
)
def test_explain_prints_the_kernel_and_the_work_of_a_real_call(spec, mask, real_tiles, capsys):
    assert cli.main(["explain", "--q-len", "2048", "--heads", "4", "--mask", spec]) == 0
    lines = capsys.readouterr().out.splitlines()
    q = torch.zeros(()).expand(1, 4, 2048, 64)
    expected = multihead.explain_call(q, q, q, mask=mask)
    assert lines[1] == f"kernel: {expected.explanation}"
    assert lines[2] == f"computes {100 * expected.fraction:.1f} % of the 1×4×2048×2048 scores"
    assert expected.explanation == multihead.explain(q, q, q, mask=mask)


def test_explain_takes_padding_rows_as_the_batch(real_tiles, capsys):
    assert cli.main(["explain", "--q-len", "64", "--mask", "padding:10,64,30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("query 3×8×64×64") and "of the 3×8×64×64 scores" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mask", "diagonal"], "unknown part 'diagonal'"),
        (["--mask", "window:0"], "expected one width of at least 1"),
        (["--mask", "window:a"], "expected whole numbers"),
        (["--q-len", "10", "--mask", "documents:3,4"], "add up to 7"),
        (["--q-len", "10", "--mask", "padding:3,11"], "exceeds k_len 10"),
        (["--batch", "2", "--mask", "padding:3,4,5", "--q-len", "8"], "gives 3 lengths"),
        (["--heads", "8", "--kv-heads", "3"], "must divide"),
        (["--q-len", "262144", "--mask", "padding:" + ",".join(["9"] * 64)], "tiles to classify"),
    ],
)
def test_explain_user_errors_are_one_line(argv, message, real_tiles, capsys):
    assert cli.main(["explain", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("multihead explain: error:")


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "--q-len", "262145"],
        ["explain", "--heads", "0"],
        ["translate", "--beam", "100000", "hi"],
        ["translate", "--beam", "0", "hi"],
        ["eval", "translate", "--beam", "65"],
        ["eval", "speech", "--utterances", "-3"],
        ["show", "translation", "hi", "--beam", "99999"],
        ["demo", "--beam", "1" + "0" * 5000],
        ["bench", "--quick", "--sizes", "100000"],
    ],
)
def test_sizes_that_cannot_fit_are_refused_while_parsing(argv, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_speech_utterances_beyond_the_limit_are_refused_before_loading(capsys):
    assert cli.main(["eval", "speech", "--utterances", "5001"]) == 2
    assert "at most 5000" in capsys.readouterr().err


def test_translate_splits_the_batch_so_a_wide_beam_fits():
    assert limits.decode_batch(1) == limits.MAX_DECODE_ROWS
    assert limits.decode_batch(limits.MAX_BEAM) * limits.MAX_BEAM <= limits.MAX_DECODE_ROWS


def test_translate_reports_undecodable_lines_and_translates_the_others():
    result = subprocess.run(
        [sys.executable, "-m", "multihead.cli", "translate", "--beam", "1"],
        input=b"Hello.\n\xff\xfe oops\n\nI like cats.\r\n",
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 1
    out = result.stdout.decode("utf-8").split("\n")
    assert out[1:4] == ["", "", "J'aime les chats."] and out[0]
    err = result.stderr.decode("utf-8").splitlines()
    assert err == [
        "multihead translate: error: line 2 is not UTF-8 (byte 0xff at offset 0): "
        "its output line is empty"
    ]


@pytest.mark.parametrize("command", [["translate"], ["show", "translation"]])
def test_a_sentence_that_is_not_text_is_refused(command, capsys):
    assert cli.main([*command, "caf\udce9"]) == 2  # how Python passes the bytes caf\xe9
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not valid UTF-8" in err[0]


def test_bench_quick_prints_the_ratio_table(capsys):
    argv = ["bench", "--quick", "--seconds", "1", "--sizes", "8", "--threads", "1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "torch MHA ms" in lines[1] and "multihead" in lines[1] and "naive" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [row[:2] for row in rows] == [["inference", "8"], ["training", "8"]]
    assert all(float(cell) > 0 for row in rows for cell in row[2:])


def test_bench_needs_quick_and_refuses_sizes_beyond_memory(monkeypatch, capsys):
    assert cli.main(["bench"]) == 2
    assert "make bench" in capsys.readouterr().err
    monkeypatch.setattr(bench, "_available_gigabytes", lambda: 1.0)
    assert cli.main(["bench", "--quick", "--sizes", "4096"]) == 2
    assert "more than the 1.0 GB available" in capsys.readouterr().err


def test_a_model_too_big_for_the_machine_is_refused_before_it_is_built(tmp_path, capsys):
    argv = ["train", "image", "--d-model", "65536", "--heads", "1", "--ff", "8", "--steps", "1"]
    assert cli.main([*argv, "--run-dir", str(tmp_path / "run"), "--no-save"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters: training it needs about" in err[0]
    assert "more than this machine's" in err[0]


def test_a_tokenizer_that_is_not_sentencepiece_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(shipped_model("translate-en-fr"), model)
    (model / "spm.model").write_text("not a model")
    assert cli.main(["translate", "hi", "--model", str(model)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"multihead translate: error: {model / 'spm.model'} is not a sentencepiece model"
    ]
