"""Train the English → French Transformer on Tatoeba; report test BLEU and chrF.

    OMP_WAIT_POLICY=PASSIVE python -m multihead.apps.translate.train --minutes 50 --bf16

(On a CPU shared with other jobs, OMP_WAIT_POLICY=PASSIVE stops torch's threads from
spinning while they wait for each other; without it two threads can be slower than one.
``--bf16`` autocasts the matrix products to bfloat16, worth it on CPUs with AMX/AVX512-BF16.)

Batches hold about ``--max-tokens`` padded tokens of similar-length pairs; the loss is
label-smoothed cross-entropy; AdamW with linear warmup, then cosine decay that follows the
time budget (or inverse square root). Every ``--eval-every`` steps a spread subset of the
valid sentences is scored: loss, and BLEU of greedy translations. Over the last
``--average-fraction`` of the run the weights are averaged every ``--average-every`` steps;
training ends with whichever of the final and the averaged weights has the better BLEU on
that valid subset. The model goes to ``--model-dir`` (safetensors + config.json + the
spm.model it needs); the test set is then translated with beam search and scored against
all references of each sentence; ``results.json``, the training log and the curves go into
``--model-dir`` beside the weights.

Under ``torchrun --nproc-per-node N`` each process trains on its sentences of every global
batch (the same batches as one process; the loss stays the mean over the global batch's
tokens), and rank 0 alone evaluates, averages, saves and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models import Seq2SeqConfig, Seq2SeqTransformer
from ...training import distributed as dist
from .. import common, limits
from ..common import Defaults
from .data import (
    PAD_ID,
    SPM_MODEL,
    Batch,
    Example,
    encode_pairs,
    load_splits,
    load_tokenizer,
    spread_subset,
    token_batches,
)
from .evaluate import evaluate_pairs

__all__ = ["EpochBatches", "build_parser", "main", "shard"]


MAX_TOKENS = limits.bounded_int(1, 65536, "padded tokens in one batch")
PROG = "python -m multihead.apps.translate.train"  # `multihead train` passes its own usage name
DEFAULTS = Defaults(
    run_dir="runs/translate-en-fr",
    model_dir="models/translate-en-fr",
    minutes=None,
    threads=2,
    lr=1e-3,
    warmup=400,
    eval_every=1000,
    d_model=256,
    heads=4,
    ff=1024,
    dropout=0.1,
    weight_decay=0.01,
    average_fraction=0.15,
    average_every=50,
    unbounded_minutes=50.0,
)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The shared training flags (`common`) and the translation app's own."""
    parser = common.build_parser(
        prog,
        "Train the English → French Transformer on Tatoeba.",
        DEFAULTS,
    )
    own = parser.add_argument_group("translation")
    arg = own.add_argument
    arg("--encoder-layers", type=int, default=3)
    arg("--decoder-layers", type=int, default=3)
    arg("--max-tokens", type=MAX_TOKENS, default=2048, help="padded tokens per batch")
    arg("--label-smoothing", type=float, default=0.1)
    arg("--bf16", action="store_true", help="bfloat16 autocast (CPU AMX)")
    arg("--valid-sentences", type=int, default=500, help="valid BLEU subset")
    arg("--checkpoint-every", type=int, default=500)
    test = parser.add_argument_group("test")
    test.add_argument("--beam", type=limits.BEAM, default=5)
    test.add_argument("--length-penalty", type=float, default=1.0)
    test.add_argument("--test-sentences", type=int, help="score only this many (spread)")
    return parser


class EpochBatches:
    """``batches(epoch)`` for the Trainer: token-budget buckets, reshuffled per epoch."""

    def __init__(self, examples: list[Example], max_tokens: int, seed: int) -> None:
        self.examples, self.max_tokens, self.seed = examples, max_tokens, seed
        self._cached: tuple[int, list[Batch]] | None = None

    def __call__(self, epoch: int) -> list[Batch]:
        if self._cached is None or self._cached[0] != epoch:
            batches = token_batches(self.examples, self.max_tokens, seed=self.seed, epoch=epoch)
            self._cached = (epoch, batches)
        return self._cached[1]


def shard(batch: Batch) -> Batch:
    """This process's sentences of a global batch (padded as the global batch is)."""
    return Batch(dist.rows(batch.src), dist.rows(batch.tgt_in), dist.rows(batch.tgt_out))


def _autocast(enabled: bool) -> contextlib.AbstractContextManager[object]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def main(
    argv: Sequence[str] | None = None,
    *,
    build_model: Callable[[Seq2SeqConfig], torch.nn.Module] = Seq2SeqTransformer,
    prog: str = PROG,
) -> int:
    """Train, choose the weights, save and test. ``build_model`` makes the model from its
    config (the benchmarks pass a ``torch.nn.Transformer`` twin to run the same recipe)."""
    args = common.parse_args(build_parser(prog), argv, DEFAULTS)
    main_process = common.start(args)
    say = print if main_process else lambda *args, **kwargs: None
    started = time.monotonic()

    splits = load_splits()
    sp = load_tokenizer()
    say(
        f"data: {len(splits.train)} train pairs, {len(splits.valid)} valid, {len(splits.test)} "
        f"test; vocabulary {sp.get_piece_size()} pieces"
    )
    config = Seq2SeqConfig(
        vocab_size=sp.get_piece_size(),
        d_model=args.d_model,
        num_heads=args.heads,
        num_encoder_layers=args.encoder_layers,
        num_decoder_layers=args.decoder_layers,
        dim_feedforward=args.ff,
        dropout=args.dropout,
    )
    train_examples = encode_pairs(splits.train, sp, config.max_len)
    valid = spread_subset(splits.valid, args.valid_sentences)
    valid_batches = token_batches(encode_pairs(valid, sp, config.max_len), 8192, shuffle=False)
    limits.check_model_fits(build_model, config)
    torch.manual_seed(args.seed)
    model = build_model(config)
    net = dist.wrap(model)  # DDP under torchrun: the forward that averages the gradients
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {config}")

    global_batches = EpochBatches(train_examples, args.max_tokens, args.seed)

    def batches(epoch: int) -> list[tuple[Batch, int]]:
        """This process's part of each global batch, and the global batch's target tokens."""
        return [(shard(batch), batch.tokens) for batch in global_batches(epoch)]

    def loss_fn(part: tuple[Batch, int]) -> tuple[Tensor, dict[str, float]]:
        batch, total_tokens = part
        with _autocast(args.bf16):
            logits = net(batch.src, batch.tgt_in)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            batch.tgt_out.flatten(),
            ignore_index=PAD_ID,
            label_smoothing=args.label_smoothing,
        )
        loss = loss * dist.mean_share(batch.tokens, total_tokens)  # the global token mean
        return loss, {"tokens": batch.tokens, "sentences": batch.src.shape[0]}

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        total, tokens = 0.0, 0
        with _autocast(args.bf16):
            for batch in valid_batches:
                logits = model(batch.src, batch.tgt_in).float()
                total += F.cross_entropy(
                    logits.flatten(0, 1),
                    batch.tgt_out.flatten(),
                    ignore_index=PAD_ID,
                    reduction="sum",
                ).item()
                tokens += batch.tokens
        scores, _ = evaluate_pairs(model, sp, valid)
        return {"valid_nll": total / tokens, "valid_bleu": scores.bleu, "valid_chrf": scores.chrf}

    average = common.weight_average(model, args)
    trainer = common.build_trainer(
        args,
        net,
        loss_fn,
        batches,
        evaluate=evaluate,
        log_every=20,
        checkpoint_every=args.checkpoint_every,
        rate_key="tokens",
        best_metric="valid_bleu",
        best_mode="max",
        average=average,
    )
    result = trainer.train()
    if not main_process:
        return 0
    print(
        f"trained {result.step} steps ({result.epoch} epochs) in {result.elapsed_seconds / 60:.1f}"
        f" min; final loss {result.final_loss}"
    )

    model.eval()
    chosen, valid_scores = "final", {}
    if average.count >= 2:
        final_state = {k: v.clone() for k, v in model.state_dict().items()}
        final_scores, _ = evaluate_pairs(model, sp, valid)
        model.load_state_dict(average.state_dict())
        average_scores, _ = evaluate_pairs(model, sp, valid)
        print(f"valid, final weights:   {final_scores}")
        print(f"valid, average of {average.count}: {average_scores}")
        valid_scores = {
            "valid_sentences": final_scores.sentences,
            "valid_bleu_final_greedy": final_scores.bleu,
            "valid_bleu_average_greedy": average_scores.bleu,
        }
        if average_scores.bleu >= final_scores.bleu:
            chosen = f"average of {average.count}"
        else:
            model.load_state_dict(final_state)

    model.save_pretrained(args.model_dir)
    shutil.copyfile(SPM_MODEL, args.model_dir / "spm.model")
    print(f"saved the model ({chosen} weights) to {args.model_dir}")

    tick = time.monotonic()
    test, rows = evaluate_pairs(
        model,
        sp,
        splits.test,
        limit=args.test_sentences,
        beam_size=args.beam,
        length_penalty=args.length_penalty,
    )
    decode_seconds = time.monotonic() - tick
    with open(args.run_dir / "test_translations.tsv", "w", encoding="utf-8") as handle:
        for source, hypothesis, refs in rows:
            handle.write("\t".join([source, hypothesis, *refs]) + "\n")
    results = {
        "test_bleu": test.bleu,
        "test_chrf": test.chrf,
        "test_sentences": test.sentences,
        "beam": args.beam,
        "length_penalty": args.length_penalty,
        "weights": chosen,
        "steps": result.step,
        "train_minutes": result.elapsed_seconds / 60,
        "test_decode_seconds": decode_seconds,
        "total_minutes": (time.monotonic() - started) / 60,
        "bleu_signature": test.bleu_signature,
        "chrf_signature": test.chrf_signature,
        **valid_scores,
        "args": common.record(args),
    }
    common.write_results(args, results, args.model_dir)
    print(f"test (beam {args.beam}): {test}")
    print(f"total time {results['total_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
