"""The translation training script end to end, on a tiny model for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

from multihead.apps.translate.train import main
from multihead.models import Seq2SeqTransformer
from multihead.training import read_log


def test_train_main_end_to_end(tmp_path: Path, capsys) -> None:
    run_dir, model_dir = tmp_path / "run", tmp_path / "model"
    tiny = ["--d-model", "32", "--heads", "2", "--encoder-layers", "1", "--decoder-layers", "1"]
    argv = [
        *("--run-dir", str(run_dir), "--model-dir", str(model_dir)),
        *tiny,
        *("--ffn", "64"),
        *("--max-steps", "4", "--max-tokens", "512", "--warmup", "2", "--eval-every", "2"),
        *("--valid-sentences", "8", "--test-sentences", "8", "--beam", "2"),
        *("--average-fraction", "0.5", "--average-every", "1", "--threads", "1"),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test (beam 2): BLEU" in out and "on 8 sentences" in out
    results = json.loads((model_dir / "results.json").read_text())
    assert results["test_sentences"] == 8 and results["steps"] == 4
    assert (model_dir / "spm.model").is_file()
    model = Seq2SeqTransformer.from_pretrained(model_dir)
    assert model.config.d_model == 32
    evals = [r for r in read_log(run_dir / "log.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"valid_bleu", "valid_chrf", "valid_nll"} <= set(evals[0])
    assert len((run_dir / "test_translations.tsv").read_text().splitlines()) == 8
