"""Data-parallel training: two processes under torchrun train as one process does.

With the same global batches and seed, DistributedDataParallel (gloo, CPU) reaches the same
weights as a single process up to the order of floating-point sums: each process sums the
gradient over its rows and the all-reduce adds the partial sums, where one process sums all
rows at once. Tolerances, after 100 steps:

- float64 (a tiny LM, ragged token-level mean): measured 2e-16 relative on the loss, 7e-12 on
  the weights; asserted at 1e-9, so the agreement is exact but for rounding.
- float32 (the image app as shipped): measured 2e-8 (train) to 1e-7 (test) relative on the
  losses; asserted at 1e-4, because rounding differences of 1e-7 grow through AdamW, which
  divides by sqrt(v) and so magnifies changes in small gradients. The extreme case is the
  attention's key bias: softmax ignores it, its gradient is pure rounding noise, and Adam
  turns that into full-size steps, so it drifts apart (~3e-3) without changing any output.
  On the app's default model (136k parameters, 100 steps) the gap is 5e-5 (train loss) and
  1e-3 (test loss): the size of the gap between one process with 1 thread and with 2
  (2e-5, 5e-4), i.e. the reach of float32 rounding, not of data parallelism.

Rank 0 alone writes; a checkpoint resumes with another number of processes, both ways.

Run as a script (``python tests/test_distributed_training.py OUT JOB...``, under torchrun or
not), this file is the worker that trains the float64 model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from multihead.models import LMConfig, TransformerLM
from multihead.training import TrainConfig, Trainer, read_log
from multihead.training import distributed as dist
from multihead.training import loop as loop_module

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

VOCAB, IGNORE, STEPS = 11, -100, 100
ROOT = Path(__file__).resolve().parents[1]


# -- the worker: a tiny float64 language model on ragged sequences --------------------------------


def _count_writes(calls: Counter[str]) -> None:
    """Count, per process, every call that writes a file of the run."""

    def counted(name: str, function):
        def inner(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return inner

    loop_module.save_checkpoint = counted("save_checkpoint", loop_module.save_checkpoint)
    loop_module.plot_curves = counted("plot_curves", loop_module.plot_curves)
    log = loop_module.MetricsLog
    log.write = counted("log.write", log.write)  # type: ignore[method-assign]
    log.reset = counted("log.reset", log.reset)  # type: ignore[method-assign]


def _job(
    out: Path, name: str, steps: int, *, minutes: float | None = None, bare: str = "",
    nan_at: int = 0,
) -> dict[str, object]:  # fmt: skip
    """Train (or resume) ``out/name`` to ``steps``. Global batches of 7 rows split 4 + 3, with
    2-8 target tokens a row, so the shares of the token-level mean differ: `mean_share` at work.
    ``nan_at``: the last rank's loss is NaN at that call of loss_fn (and skipped)."""
    calls = Counter[str]()
    torch.manual_seed(1)
    config = LMConfig(
        vocab_size=VOCAB, d_model=16, num_heads=2, num_layers=1, dim_feedforward=32,
        max_len=8, dropout=0.0,
    )  # fmt: skip
    model = TransformerLM(config).double()
    net = dist.wrap(model)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (42, 9), generator=g)
    lengths = torch.randint(3, 10, (42,), generator=g)
    data[torch.arange(9) >= lengths[:, None]] = IGNORE

    def batches(epoch: int) -> list[tuple[Tensor, int]]:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        full = [data[rows] for rows in order.split(7)]
        return [(dist.rows(b), int((b[:, 1:] != IGNORE).sum())) for b in full]

    def loss_fn(batch: tuple[Tensor, int]):
        ids, total = batch
        targets = ids[:, 1:]
        logits = (model if bare == "loss_fn" else net)(ids[:, :-1].clamp(min=0))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        tokens = int((targets != IGNORE).sum())
        calls["loss_fn"] += 1
        if calls["loss_fn"] == nan_at and dist.rank() == dist.world_size() - 1:
            loss = loss * math.nan
        return loss * dist.mean_share(tokens, total), {"tokens": tokens}

    def after_step(trainer: Trainer) -> None:
        if minutes is not None:  # ranks at different speeds; the time budget must still agree
            time.sleep(0.002 * (1 + 3 * trainer.rank))

    settings = TrainConfig(
        run_dir=out / name, lr=3e-3, max_steps=steps, time_budget_minutes=minutes,
        log_every=1, checkpoint_every=25, rate_key="tokens", resume=True,
        progress_bar=False, plot=True, on_nonfinite="skip" if nan_at else "stop",
    )  # fmt: skip
    trainer = Trainer(model if bare == "model" else net, loss_fn, batches, settings,
                      after_step=after_step)  # fmt: skip
    result = trainer.train()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {
        "step": result.step,
        "loss": result.final_loss,
        "weights": flat.tolist(),
        "skipped": trainer.skipped,
    }


def worker(out: Path, jobs: list[str]) -> None:
    """Run ``jobs`` ("name:steps", "name:steps:minutes", "nan:steps:call" or "misuse") and
    write what each process saw to ``out/name.rankR.json``."""
    context = dist.setup()
    torch.set_num_threads(1)
    calls: Counter[str] = Counter()
    _count_writes(calls)
    for job in jobs:
        name, *rest = job.split(":")
        report: dict[str, object]
        if name == "misuse":
            errors = []
            for bare in ("model", "loss_fn"):
                try:
                    _job(out, f"misuse-{bare}", 2, bare=bare)
                except ValueError as error:
                    errors.append(str(error))
            report = {"errors": errors}
        elif name == "nan":
            report = _job(out, name, int(rest[0]), nan_at=int(rest[1]))
        else:
            minutes = float(rest[1]) if len(rest) > 1 else None
            report = _job(out, name, int(rest[0]), minutes=minutes)
        report.update(world=context.world_size, backend=context.backend, writes=dict(calls))
        (out / f"{name}.rank{context.rank}.json").write_text(json.dumps(report))
        calls.clear()


# -- launching -----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(argv: list[str], processes: int, cwd: Path) -> str:
    """Run ``argv`` (after ``python``) in one process, or under torchrun in several."""
    launch = [sys.executable]
    if processes > 1:  # --standalone: a free port, so parallel runs do not collide
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run(
        [*launch, *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _report(out: Path, name: str, rank: int = 0) -> dict:
    return json.loads((out / f"{name}.rank{rank}.json").read_text())


def _relative(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((x - y).abs().max() / y.abs().max())


@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory) -> Path:
    """1 process: 100 steps, and 50. 2 processes: misuse, 100 steps, 50, a time budget, a NaN
    loss on one rank, and the 1-process 50 resumed to 100. 1 process again: the 2-process 50
    resumed to 100."""
    out = tmp_path_factory.mktemp("ddp64")
    script = [str(Path(__file__)), str(out)]
    _run([*script, f"one:{STEPS}", "one_then_two:50"], 1, out)
    jobs = ["misuse", f"two:{STEPS}", "two_then_one:50", "budget:100000:0.01", "nan:30:10"]
    _run([*script, *jobs, f"one_then_two:{STEPS}"], 2, out)
    _run([*script, f"two_then_one:{STEPS}"], 1, out)
    return out


# -- the tests -----------------------------------------------------------------------------------


def test_single_process_needs_nothing() -> None:
    model = torch.nn.Linear(2, 2)
    x = torch.arange(6.0).reshape(3, 2)
    assert dist.context() == dist.Context(0, 0, 1, torch.device("cpu"), None)
    assert dist.wrap(model) is model and dist.unwrap(model) is model
    assert dist.rows(x) is x and dist.mean_share(5, 5) == 1.0
    assert dist.all_equal(3) and torch.equal(dist.sum_all(x.clone()), x)
    assert dist.is_main() and dist.choose_backend() in ("gloo", "cpu:gloo,cuda:nccl")
    with pytest.raises(ValueError, match="total"):
        dist.mean_share(1, 0)


def test_a_torchrun_process_that_did_not_join_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(2, 1)
    settings = TrainConfig(run_dir="unused", max_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match="have not joined"):
        Trainer(model, lambda batch: (model(batch).sum(), {}), lambda epoch: [], settings)


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: world)


def test_translation_shards_weight_the_token_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shares of 5 sentences with 2-6 target tokens: the mean over processes of each one's
    weighted token mean is the global batch's token mean (what DDP's gradient average sees)."""
    from multihead.apps.translate.data import PAD_ID, Batch
    from multihead.apps.translate.train import shard

    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(4, 20, (5, 6), generator=g)
    tgt[torch.arange(6) >= torch.tensor([2, 6, 3, 5, 4])[:, None]] = PAD_ID
    batch = Batch(src=torch.randint(4, 20, (5, 7), generator=g), tgt_in=tgt, tgt_out=tgt)
    logits = torch.randn(5, 6, 20, generator=g, dtype=torch.float64)

    def loss(rows: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(rows.flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)

    for world in (2, 3):
        losses, parts = [], []
        for rank in range(world):
            _as_rank(monkeypatch, rank, world)
            part = shard(batch)
            rows = dist.rows(logits)
            parts.append(part)
            losses.append(loss(rows, part.tgt_out) * dist.mean_share(part.tokens, batch.tokens))
        assert torch.equal(torch.cat([p.src for p in parts]), batch.src)
        assert sum(p.tokens for p in parts) == batch.tokens
        torch.testing.assert_close(sum(losses) / world, loss(logits, batch.tgt_out))
    _as_rank(monkeypatch, 0, 6)
    with pytest.raises(ValueError, match="5 rows cannot be split over 6 processes"):
        shard(batch)


def test_speech_shards_carry_their_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    from multihead.apps.speech.train import SpeechBatch, shard

    lengths = torch.tensor([3, 1, 4, 2, 5])
    batch = SpeechBatch(
        feats=torch.randn(5, 9, 4), frames=torch.tensor([9, 8, 7, 9, 8]),
        targets=torch.arange(int(lengths.sum())), target_lengths=lengths,
    )  # fmt: skip
    parts = []
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        parts.append(shard(batch))
    assert [len(p.frames) for p in parts] == [3, 2]
    assert torch.equal(parts[0].targets, torch.arange(8))  # 3 + 1 + 4 tokens
    assert torch.equal(parts[1].targets, torch.arange(8, 15))
    for field in ("feats", "frames", "targets", "target_lengths"):
        joined = torch.cat([getattr(p, field) for p in parts])
        assert torch.equal(joined, getattr(batch, field)), field


def test_two_processes_match_one_in_float64(float64_runs: Path) -> None:
    one, two, two_b = (_report(float64_runs, n, r) for n, r in (("one", 0), ("two", 0), ("two", 1)))
    assert two["world"] == 2 and two["backend"] == "gloo" and one["world"] == 1
    assert one["step"] == two["step"] == STEPS
    assert two["weights"] == two_b["weights"]  # the ranks never drift apart: bitwise equal
    assert abs(two["loss"] - one["loss"]) <= 1e-9 * abs(one["loss"])
    assert _relative(two["weights"], one["weights"]) < 1e-9
    steps_one = read_log(float64_runs / "one" / "log.jsonl")
    steps_two = read_log(float64_runs / "two" / "log.jsonl")
    assert [r["step"] for r in steps_two if r["kind"] == "train"] == list(range(1, STEPS + 1))
    losses = [[r["loss"] for r in log if r["kind"] == "train"] for log in (steps_one, steps_two)]
    assert _relative(losses[1], losses[0]) < 1e-9
    tokens = [[r["tokens"] for r in log if r["kind"] == "train"] for log in (steps_one, steps_two)]
    assert tokens[0] == tokens[1]  # the rate key is summed over the processes


def test_only_rank_zero_writes(float64_runs: Path) -> None:
    rank0, rank1 = (_report(float64_runs, "two", r)["writes"] for r in (0, 1))
    assert rank1 == {}
    assert rank0["log.write"] == STEPS and rank0["save_checkpoint"] == STEPS // 25
    assert rank0["plot_curves"] == 1 and rank0["log.reset"] == 1
    files = sorted(p.name for p in (float64_runs / "two").iterdir())
    assert files == ["curves.png", "last", "last.previous", "log.jsonl", "train_config.json"]


@pytest.mark.parametrize("name", ["two_then_one", "one_then_two"])
def test_resume_with_another_number_of_processes(float64_runs: Path, name: str) -> None:
    one, resumed = _report(float64_runs, "one"), _report(float64_runs, name)
    assert resumed["world"] == (1 if name == "two_then_one" else 2)
    assert resumed["step"] == STEPS
    # Constant learning rate, no dropout: the resumed run is the uninterrupted one.
    assert _relative(resumed["weights"], one["weights"]) < 1e-9
    steps = [r["step"] for r in read_log(float64_runs / name / "log.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # 1-50 before, 51-100 after: none twice


def test_time_budget_stops_every_process_at_the_same_step(float64_runs: Path) -> None:
    rank0, rank1 = (_report(float64_runs, "budget", r) for r in (0, 1))
    assert 0 < rank0["step"] == rank1["step"] < 100000  # and neither hung in a collective
    assert rank0["weights"] == rank1["weights"]


def test_a_nan_loss_on_one_rank_is_skipped_by_all(float64_runs: Path) -> None:
    rank0, rank1 = (_report(float64_runs, "nan", r) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 30 and rank0["skipped"] == rank1["skipped"] == 1
    assert rank0["weights"] == rank1["weights"] and math.isfinite(rank0["loss"])
    records = read_log(float64_runs / "nan" / "log.jsonl")
    skipped = [r for r in records if r["kind"] == "nonfinite"]
    assert len(skipped) == 1 and "non-finite in 1 of 2 processes" in skipped[0]["what"]


def test_a_model_or_loss_that_bypasses_ddp_is_refused(float64_runs: Path) -> None:
    for rank in (0, 1):
        errors = _report(float64_runs, "misuse", rank)["errors"]
        assert len(errors) == 2
        assert "not wrapped" in errors[0] and "did not call" in errors[1]


def test_image_app_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    """The shipped command, tiny: ``torchrun --nproc-per-node 2 -m multihead.cli train image``
    in float32 against one process; then the 1-process run resumed by 2 processes."""
    tiny = [
        *("--d-model", "16", "--heads", "2", "--layers", "1", "--ff", "32", "--warmup", "10"),
        *("--steps", str(STEPS), "--eval-every", "50", "--minutes", "60", "--threads", "1"),
        "--no-progress",
    ]

    def train(name: str, processes: int, *extra: str) -> None:
        run = ["--run-dir", f"{name}/run", "--model-dir", f"{name}/model"]
        _run(["-m", "multihead.cli", "train", "image", *tiny, *run, *extra], processes, tmp_path)

    train("one", 1)
    train("two", 2)
    logs = {n: read_log(tmp_path / n / "run" / "log.jsonl") for n in ("one", "two")}
    train_steps = [r["step"] for r in logs["two"] if r["kind"] == "train"]
    assert train_steps == [25, 50, 75, 100]  # logged once, by rank 0
    for kind, key in (("train", "loss"), ("eval", "test_loss")):
        values = [[r[key] for r in logs[n] if r["kind"] == kind] for n in ("one", "two")]
        assert _relative(values[1], values[0]) < 1e-4, (kind, values)
    weights = [load_file(tmp_path / n / "model" / "model.safetensors") for n in ("one", "two")]
    for key, value in weights[0].items():
        other = weights[1][key]
        if key.endswith("in_proj.bias"):
            # Not the key bias: it shifts every score of a query equally, which softmax
            # ignores, so its gradient is rounding noise that Adam scales up to full steps
            # (it drifts by ~3e-3 between the runs; the outputs cannot tell).
            value, other = (torch.cat([w[:16], w[32:]]) for w in (value, other))
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5)
    assert not [p for p in (tmp_path / "two").rglob(".*")]  # no leftover temporary files

    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    train("resumed", 2, "--resume", "--steps", "120")
    records = read_log(tmp_path / "resumed" / "run" / "log.jsonl")
    assert [r["step"] for r in records if r["kind"] == "eval"] == [50, 100, 120]
    metrics = json.loads((tmp_path / "resumed" / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 120
    assert 0 < records[-1]["test_loss"] < 1.5 * logs["one"][-1]["test_loss"]


def test_translation_app_under_torchrun(tmp_path: Path) -> None:
    """The seq2seq model under DDP, end to end: rank 0 alone evaluates, averages and tests."""
    argv = [
        *("-m", "multihead.cli", "train", "translate", "--run-dir", "run", "--model-dir", "model"),
        *("--d-model", "32", "--heads", "2", "--encoder-layers", "1", "--decoder-layers", "1"),
        *("--ffn", "64", "--max-steps", "6", "--max-tokens", "512", "--warmup", "2"),
        *("--eval-every", "3", "--valid-sentences", "8", "--test-sentences", "8", "--beam", "2"),
        *("--average-fraction", "0.5", "--average-every", "1", "--threads", "1"),
        "--no-progress",
    ]
    out = _run(argv, 2, tmp_path)
    assert out.count("test (beam 2): BLEU") == 1  # printed by rank 0 only
    assert json.loads((tmp_path / "model" / "results.json").read_text())["steps"] == 6
    records = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
