"""Seq2Seq benchmark: the library's Transformer models against `torch.nn.Transformer`.

One process, two threads, fp32. Three parts, each timing its contenders interleaved
round-robin (the order rotates every round), so a noisy neighbour slows all of them alike:

1. Training. `Seq2SeqTransformer` (pre-norm, d_model 256, 4 heads, 3+3 layers, ffn 1024,
   shared embeddings tied to the output, sinusoidal positions, sqrt(d) embedding scale) against
   the same architecture built around `torch.nn.Transformer`, starting from the SAME weights
   (ours are copied into torch's). Real token-budget batches of the Tatoeba en→fr training
   split (max_tokens 2048), label-smoothed cross-entropy (0.1), AdamW as the translation
   trainer sets it up (decay on matrices only, betas 0.9/0.98, clip 1.0, linear warmup).
   Both models see the same batches in the same order. Run once with dropout 0.1 (the real
   configuration: throughput, loss curves differ only by dropout noise) and once with dropout
   0 (the loss curves must agree up to float rounding, which training amplifies: an untimed
   float64 run of both shows how close the two functions really are). Target: tokens/s
   ours / torch ≥ 1.
2. Decoding with a decoder-only `TransformerLM` (d_model 512, 8 heads, 6 layers, batch 1):
   512 greedy tokens after a 128-token prompt, (a) with the preallocated `KVCache`,
   (b) recomputing the whole prefix every step, (c) with a cache that grows by `torch.cat`
   each step (written here: a `KVCache` subclass, same model, same loop as `generate`).
   Targets: (a) ≥ 5× faster than (b), and faster than (c).
3. Greedy translation of the test set (sentences/s), batches of 128 sentences of similar
   length: ours (`generate`, with its caches) against the torch model with the same weights
   decoded by a greedy loop that recomputes the prefix every step (`nn.Transformer` has no
   KV cache), plus ours without cache to show what the cache is worth on its own.
   Uses the trained model in models/translate-en-fr/ when it exists, else a randomly
   initialised one of the same size (the JSON says which).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_seq2seq.py          # full run
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_seq2seq.py --quick  # smoke test

(OMP_WAIT_POLICY=PASSIVE is set by the script itself when absent: on a shared CPU, spinning
OpenMP threads make two threads slower than one.) Writes ``results/seq2seq.json`` and
``results/seq2seq.png`` (``seq2seq_quick.*`` with --quick).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import cpu_model, interleave, load_average, paired_ratio
from torch import Tensor, nn
from torch_twins import TorchSeq2Seq, copy_seq2seq_weights

import multihead
from multihead.apps.translate.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPM_MODEL,
    Batch,
    encode_pairs,
    load_splits,
    load_tokenizer,
    pad,
    references,
    spread_subset,
    token_batches,
)
from multihead.apps.translate.evaluate import score
from multihead.cache import KVCache
from multihead.models import LMConfig, Seq2SeqConfig, Seq2SeqTransformer, TransformerLM

THREADS = 2
SEED = 0
RESULTS = Path(__file__).resolve().parent / "results"
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "translate-en-fr"
PARTS = ("training", "decoding", "translation")

# 1. training
MAX_TOKENS = 2048
TRAIN_STEPS, QUICK_TRAIN_STEPS = 200, 12
FLOAT64_STEPS, QUICK_FLOAT64_STEPS = 60, 4  # untimed: are the two models the same function?
TIMING_WARMUP = 5  # the first steps of each run are trained and plotted but not timed
LR, BETAS, WEIGHT_DECAY, CLIP, LR_WARMUP = 1e-3, (0.9, 0.98), 0.01, 1.0, 50
LABEL_SMOOTHING = 0.1
DROPOUTS = (0.1, 0.0)

# 2. decoding
LM_SIZES = {"d_model": 512, "num_heads": 8, "num_layers": 6, "dim_feedforward": 2048}
LM_VOCAB = 8000  # the translation vocabulary's size
PROMPT, NEW_TOKENS = 128, 512
QUICK_PROMPT, QUICK_NEW_TOKENS = 64, 64
DECODE_ROUNDS, QUICK_DECODE_ROUNDS = 5, 2
RECOMPUTE_REPEATS = 2  # the slow contender (b) runs in only this many of the rounds (1 quick)

# 3. translation
TRANSLATE_BATCH = 128
QUICK_SENTENCES = 256


# -- timing ------------------------------------------------------------------------------------


def round_robin(
    steps: dict[str, Callable[[int], float]], rounds: int, repeats: dict[str, int] | None = None
) -> dict[str, list[tuple[int, float]]]:
    """`bench_common.interleave`: ``steps[key](round)`` returns its wall time."""
    return interleave(steps, rounds, repeats)


def source_digest() -> str:
    """sha256 of the package's .py files as they are now: which library state was measured."""
    root = Path(multihead.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_pair(config: Seq2SeqConfig, seed: int) -> tuple[Seq2SeqTransformer, TorchSeq2Seq]:
    torch.manual_seed(seed)
    ours = Seq2SeqTransformer(config)
    theirs = TorchSeq2Seq(config)
    copy_seq2seq_weights(ours, theirs)
    return ours, theirs


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def max_logit_difference(ours: Seq2SeqTransformer, theirs: TorchSeq2Seq, batch: Batch) -> float:
    """Same weights, eval mode: the largest |logit difference| at the real target tokens."""
    modes = ours.training, theirs.training
    ours.eval(), theirs.eval()
    try:
        a = ours(batch.src, batch.tgt_in)
        b = theirs(batch.src, batch.tgt_in)
    finally:
        ours.train(modes[0]), theirs.train(modes[1])
    keep = batch.tgt_out != PAD_ID
    return float((a - b)[keep].abs().max())


# -- 1. training -------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainRun:
    """One training run of one contender: per-step losses and wall times (all steps)."""

    dropout: float
    contender: str
    losses: list[float] = dataclasses.field(default_factory=list)
    times_s: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)


def make_optimizer(model: nn.Module) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW as the translation trainer builds it (no decay on biases and norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / LR_WARMUP)
    )
    return optimizer, warmup


def make_train_step(
    model: nn.Module, batches: Sequence[Batch], run: TrainRun, bf16: bool = False
) -> Callable[[int], float]:
    """One training step per call; ``bf16`` autocasts the forward as the translation recipe's
    ``--bf16`` does."""
    optimizer, scheduler = make_optimizer(model)
    model.train()

    def step(index: int) -> float:
        batch = batches[index]
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch.src, batch.tgt_in)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            batch.tgt_out.flatten(),
            ignore_index=PAD_ID,
            label_smoothing=LABEL_SMOOTHING,
        )
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - start
        run.losses.append(loss.item())
        run.times_s.append(elapsed)
        run.tokens.append(batch.tokens)
        return elapsed

    return step


def summarise_training(ours: TrainRun, theirs: TrainRun) -> dict[str, Any]:
    timed = slice(TIMING_WARMUP, None)

    def rate(run: TrainRun) -> float:
        return sum(run.tokens[timed]) / sum(run.times_s[timed])

    pairs = list(zip(ours.times_s[timed], theirs.times_s[timed], strict=True))
    differences = [abs(a - b) for a, b in zip(ours.losses, theirs.losses, strict=True)]
    return {
        "dropout": ours.dropout,
        "steps": len(ours.losses),
        "timed_steps": len(pairs),
        "tokens_per_s": {"ours": rate(ours), "torch": rate(theirs)},
        "median_step_s": {
            "ours": statistics.median(ours.times_s[timed]),
            "torch": statistics.median(theirs.times_s[timed]),
        },
        "ratio_ours_over_torch": rate(ours) / rate(theirs),
        "paired_ratio_ours_over_torch": statistics.median(t / o for o, t in pairs),
        "max_abs_loss_difference": max(differences),
        "loss_difference_first_step": differences[0],
        "final_loss": {"ours": ours.losses[-1], "torch": theirs.losses[-1]},
        "losses": {"ours": ours.losses, "torch": theirs.losses},
        "step_times_s": {"ours": ours.times_s, "torch": theirs.times_s},
        "target_tokens": ours.tokens,
    }


def float64_check(config: Seq2SeqConfig, batches: Sequence[Batch]) -> dict[str, Any]:
    """Both models trained in float64 (dropout 0) on ``batches``: if they compute the same
    function, the losses agree to ~1e-15 and the fp32 gap is rounding that training amplifies."""
    ours, theirs = build_pair(dataclasses.replace(config, dropout=0.0), SEED)
    ours.double(), theirs.double()
    record = {"ours": TrainRun(0.0, "ours"), "torch": TrainRun(0.0, "torch")}
    steps = {
        key: make_train_step(m, batches, record[key])
        for key, m in (("ours", ours), ("torch", theirs))
    }
    round_robin(steps, len(batches))
    gaps = [abs(a - b) for a, b in zip(record["ours"].losses, record["torch"].losses, strict=True)]
    print(f"  float64, dropout 0, {len(batches)} steps: max |loss difference| {max(gaps):.1e}")
    return {"steps": len(batches), "max_abs_loss_difference": max(gaps), "differences": gaps}


def bench_training(steps: int, float64_steps: int, bf16: bool = False) -> dict[str, Any]:
    splits = load_splits()
    sp = load_tokenizer()
    base = Seq2SeqConfig(vocab_size=sp.get_piece_size())
    examples = encode_pairs(splits.train, sp, base.max_len)
    batches = token_batches(examples, MAX_TOKENS, seed=SEED, epoch=0)[:steps]
    if len(batches) < steps:
        raise ValueError(f"only {len(batches)} batches in an epoch, {steps} steps asked")

    counts: dict[str, int] = {}
    runs: dict[str, Any] = {}
    logit_difference = 0.0
    for dropout in DROPOUTS:
        config = dataclasses.replace(base, dropout=dropout)
        ours, theirs = build_pair(config, SEED)  # the same initial weights in every run
        counts = {"ours": parameter_count(ours), "torch": parameter_count(theirs)}
        logit_difference = max(logit_difference, max_logit_difference(ours, theirs, batches[0]))
        record = {"ours": TrainRun(dropout, "ours"), "torch": TrainRun(dropout, "torch")}
        steps_by_key = {
            "ours": make_train_step(ours, batches, record["ours"], bf16),
            "torch": make_train_step(theirs, batches, record["torch"], bf16),
        }
        print(f"training, dropout {dropout}: {steps} steps each, interleaved", flush=True)
        round_robin(steps_by_key, steps)
        summary = summarise_training(record["ours"], record["torch"])
        runs[f"dropout_{dropout:g}"] = summary
        print(
            f"  tokens/s ours {summary['tokens_per_s']['ours']:.0f}, torch "
            f"{summary['tokens_per_s']['torch']:.0f}: ratio {summary['ratio_ours_over_torch']:.3f} "
            f"(paired {summary['paired_ratio_ours_over_torch']:.3f}); max |loss difference| "
            f"{summary['max_abs_loss_difference']:.2e}; final loss ours "
            f"{summary['final_loss']['ours']:.4f}, torch {summary['final_loss']['torch']:.4f}",
            flush=True,
        )
    print(f"  parameters: ours {counts['ours']:,}, torch {counts['torch']:,}")
    headline = runs["dropout_0.1"]
    return {
        "config": {
            **base.__dict__,
            "dropout": list(DROPOUTS),
            "max_tokens": MAX_TOKENS,
            "optimizer": (
                f"AdamW lr {LR}, betas {BETAS}, weight decay {WEIGHT_DECAY} on matrices only, "
                f"linear warmup {LR_WARMUP} steps, grad clip {CLIP}"
            ),
            "loss": f"cross-entropy, label smoothing {LABEL_SMOOTHING}, pad ignored",
            "batches": f"the first {steps} token-budget batches of epoch 0 (seed {SEED})",
            "timing": (
                f"forward + loss + backward + clip + AdamW step; first {TIMING_WARMUP} steps "
                "untimed; tokens/s = real target tokens / time"
            ),
            "autocast": "bfloat16 (the recipe's --bf16)" if bf16 else None,
        },
        "parameters": counts,
        "parameters_match": counts["ours"] == counts["torch"],
        "max_logit_difference_same_weights": logit_difference,
        "runs": runs,
        "ratio_ours_over_torch": headline["ratio_ours_over_torch"],
        "paired_ratio_ours_over_torch": headline["paired_ratio_ours_over_torch"],
        "target": "tokens/s ours / torch >= 1.0 (dropout 0.1)",
        "target_met": headline["ratio_ours_over_torch"] >= 1.0,
        "loss_curves_dropout0_max_abs_difference": runs["dropout_0"]["max_abs_loss_difference"],
        "float64_check": float64_check(base, batches[:float64_steps]) if float64_steps else None,
    }


# -- 2. decoding -------------------------------------------------------------------------------


class CatKVCache(KVCache):
    """A KV cache that grows by ``torch.cat`` at every step: no preallocation, a new copy of
    every cached key and value each time. `MultiHeadAttention` uses only ``append``."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, like: Tensor) -> None:
        # No super().__init__: there are no buffers to preallocate.
        empty = like.new_empty(batch_size, num_kv_heads, 0, head_dim)
        self.keys, self.values, self.length = empty, empty, 0

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.keys = torch.cat([self.keys, key], dim=2)
        self.values = torch.cat([self.values, value], dim=2)
        self.length = self.keys.shape[2]
        return self.keys, self.values


@torch.no_grad()
def generate_cat_cache(model: TransformerLM, ids: Tensor, max_new_tokens: int) -> Tensor:
    """`TransformerLM.generate`'s greedy loop with `CatKVCache` instead of `KVCache`."""
    model.eval()
    like = model.embedding.weight
    caches: list[KVCache] = [
        CatKVCache(ids.shape[0], block.self_attn.num_kv_heads, block.self_attn.head_dim, like)
        for block in model.blocks.layers
    ]
    fed = 0
    for _ in range(max_new_tokens):
        logits = model(ids[:, fed:], offset=fed, caches=caches)
        fed = ids.shape[1]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def bench_decoding(prompt: int, new_tokens: int, rounds: int, recompute: int) -> dict[str, Any]:
    torch.manual_seed(SEED)
    config = LMConfig(vocab_size=LM_VOCAB, max_len=prompt + new_tokens, dropout=0.0, **LM_SIZES)
    model = TransformerLM(config).eval()
    ids = torch.randint(4, LM_VOCAB, (1, prompt), generator=torch.Generator().manual_seed(SEED))
    contenders: dict[str, tuple[str, Callable[[], Tensor]]] = {
        "a": ("preallocated KVCache", lambda: model.generate(ids, max_new_tokens=new_tokens)),
        "b": (
            "recompute the prefix",
            lambda: model.generate(ids, max_new_tokens=new_tokens, use_cache=False),
        ),
        "c": ("torch.cat cache", lambda: generate_cat_cache(model, ids, new_tokens)),
    }
    outputs: dict[str, Tensor] = {}

    def timed(key: str) -> Callable[[int], float]:
        def run(_round: int) -> float:
            start = time.perf_counter()
            outputs[key] = contenders[key][1]()
            return time.perf_counter() - start

        return run

    print(
        f"decoding: TransformerLM {LM_SIZES}, batch 1, prompt {prompt}, {new_tokens} new tokens",
        flush=True,
    )
    # Warm-up: a short generation each (the allocator, the kernels' first calls).
    for key in contenders:
        with torch.no_grad():
            if key == "b":
                model.generate(ids, max_new_tokens=4, use_cache=False)
            elif key == "a":
                model.generate(ids, max_new_tokens=16)
            else:
                generate_cat_cache(model, ids, 16)
    times = round_robin({k: timed(k) for k in contenders}, rounds, {"b": recompute})
    medians = {k: statistics.median(t for _, t in v) for k, v in times.items()}
    generated = {k: out[0, prompt:] for k, out in outputs.items()}
    agree = {
        k: int((generated[k] == generated["a"]).sum()) for k in generated if k != "a"
    }  # greedy tokens equal to (a)'s
    result: dict[str, Any] = {
        "config": {**config.__dict__, "batch": 1, "prompt": prompt, "new_tokens": new_tokens},
        "weights": "random (seed 0): timing does not depend on what is generated",
        "contenders": {k: label for k, (label, _) in contenders.items()},
        "total_s": medians,
        "ms_per_token": {k: 1e3 * t / new_tokens for k, t in medians.items()},
        "times_s": {k: [t for _, t in v] for k, v in times.items()},
        "rounds": {k: [r for r, _ in v] for k, v in times.items()},
        "speedup_a_over_b": medians["b"] / medians["a"],
        "speedup_a_over_c": medians["c"] / medians["a"],
        "paired_speedup_a_over_c": 1 / paired_ratio(times["a"], times["c"]),
        "tokens_equal_to_a": {**agree, "of": new_tokens},
        "targets": {
            "a_at_least_5x_faster_than_b": medians["b"] / medians["a"] >= 5.0,
            "a_faster_than_c": medians["a"] < medians["c"],
        },
    }
    for key, (label, _) in contenders.items():
        print(
            f"  ({key}) {label:22s} {medians[key]:8.3f} s  "
            f"{result['ms_per_token'][key]:7.2f} ms/token  ({len(times[key])} runs)",
            flush=True,
        )
    print(
        f"  (a) is {result['speedup_a_over_b']:.1f}x faster than (b), "
        f"{result['speedup_a_over_c']:.2f}x faster than (c) "
        f"(paired {result['paired_speedup_a_over_c']:.2f}x); greedy tokens equal to (a): {agree}",
        flush=True,
    )
    return result


# -- 3. translation ----------------------------------------------------------------------------


def strip_ids(row: list[int]) -> list[int]:
    """As `Seq2SeqTransformer.generate`: cut at eos, drop pad and bos."""
    if EOS_ID in row:
        row = row[: row.index(EOS_ID)]
    return [i for i in row if i not in (PAD_ID, BOS_ID)]


@torch.no_grad()
def torch_greedy(model: TorchSeq2Seq, src: Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding with torch's modules: no cache, so each step reruns the decoder on the
    whole prefix (the logits only for the last position). Same rules as our greedy search."""
    c = model.config
    model.eval()
    memory, src_pad = model.encode(src)
    batch = src.shape[0]
    tokens = src.new_full((batch, 1), c.bos_id)
    finished = torch.zeros(batch, dtype=torch.bool)
    never = torch.tensor([c.pad_id, c.bos_id])
    for _ in range(min(max_new_tokens, c.max_len)):
        hidden = model.decode_hidden(tokens, memory, src_pad)[:, -1]
        log_probs = F.log_softmax(F.linear(hidden, model.embedding.weight).float(), dim=-1)
        next_token = log_probs.index_fill(-1, never, -math.inf).argmax(-1)
        next_token = next_token.masked_fill(finished, c.pad_id)
        tokens = torch.cat([tokens, next_token.unsqueeze(-1)], dim=1)
        finished |= next_token == c.eos_id
        if bool(finished.all()):
            break
    return [strip_ids(row) for row in tokens[:, 1:].tolist()]


def load_translation_model() -> tuple[Seq2SeqTransformer, Any, str]:
    """The shipped model and its tokenizer, else a random model of the same size."""
    if (MODEL_DIR / "model.safetensors").is_file() and (MODEL_DIR / "config.json").is_file():
        spm_path = MODEL_DIR / "spm.model"
        sp = load_tokenizer(spm_path if spm_path.is_file() else SPM_MODEL)
        model = Seq2SeqTransformer.from_pretrained(MODEL_DIR)
        return model, sp, f"trained: {MODEL_DIR.relative_to(MODEL_DIR.parents[1])}"
    sp = load_tokenizer()
    torch.manual_seed(SEED)
    model = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=sp.get_piece_size()))
    return model.eval(), sp, f"random init (seed {SEED}): {MODEL_DIR.name} was not found"


def bench_translation(sentences: int | None) -> dict[str, Any]:
    model, sp, source = load_translation_model()
    model.eval()
    twin = TorchSeq2Seq(copy.deepcopy(model.config)).eval()
    copy_seq2seq_weights(model, twin)
    grouped = references(spread_subset(load_splits().test, sentences))
    english = [e for e, _ in grouped]
    max_len = model.config.max_len
    # As evaluate.translate: truncate, add eos, sort by length, batches of similar length.
    encoded = [ids[: max_len - 1] + [EOS_ID] for ids in sp.encode(english)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    chunks = [order[i : i + TRANSLATE_BATCH] for i in range(0, len(order), TRANSLATE_BATCH)]
    print(
        f"translation: {len(english)} test sentences, {len(chunks)} batches of <= "
        f"{TRANSLATE_BATCH}; model {source}",
        flush=True,
    )

    def decode_ours(use_cache: bool) -> Callable[[Tensor, int], list[list[int]]]:
        def run(src: Tensor, limit: int) -> list[list[int]]:
            return model.generate(src, max_new_tokens=limit, use_cache=use_cache)

        return run

    contenders: dict[str, tuple[str, Callable[[Tensor, int], list[list[int]]]]] = {
        "ours": ("ours: generate with KV + cross-attention caches", decode_ours(True)),
        "torch": (
            "torch.nn.Transformer: greedy loop, no cache",
            lambda src, limit: torch_greedy(twin, src, limit),
        ),
        "ours_no_cache": ("ours: generate(use_cache=False)", decode_ours(False)),
    }
    hypotheses: dict[str, dict[int, list[int]]] = {key: {} for key in contenders}

    def timed(key: str) -> Callable[[int], float]:
        def run(index: int) -> float:
            chunk = chunks[index]
            src = pad([encoded[i] for i in chunk])
            limit = 2 * src.shape[1] + 10
            start = time.perf_counter()
            out = contenders[key][1](src, limit)
            elapsed = time.perf_counter() - start
            hypotheses[key].update(zip(chunk, out, strict=True))
            return elapsed

        return run

    with torch.no_grad():  # warm-up on a few short sentences
        src = pad([encoded[i] for i in order[:8]])
        for _, run in contenders.values():
            run(src, 8)
    times = round_robin({k: timed(k) for k in contenders}, len(chunks))
    totals = {k: sum(t for _, t in v) for k, v in times.items()}
    per_s = {k: len(english) / t for k, t in totals.items()}
    texts = {k: sp.decode([h[i] for i in range(len(english))]) for k, h in hypotheses.items()}
    refs = [r for _, r in grouped]
    bleu = {k: round(score(t, refs).bleu, 2) for k, t in texts.items()}
    same = {
        k: sum(hypotheses[k][i] == hypotheses["ours"][i] for i in range(len(english)))
        for k in contenders
        if k != "ours"
    }
    result: dict[str, Any] = {
        "model": source,
        "config": model.config.__dict__,
        "sentences": len(english),
        "batch": TRANSLATE_BATCH,
        "max_new_tokens": "2 × padded source length + 10 per batch, at most max_len",
        "note": (
            "torch.nn.Transformer has no KV cache: its greedy loop recomputes the whole target "
            "prefix through the decoder each step (logits only for the last position). "
            "'ours_no_cache' is generate(use_cache=False): it also recomputes the prefix (and the "
            "memory's cross-attention keys/values) every step, but projects every position to "
            "logits, not only the last, so it does more work than the torch loop. "
            "ours/ours_no_cache is what the caches are worth."
        ),
        "contenders": {k: label for k, (label, _) in contenders.items()},
        "total_s": totals,
        "sentences_per_s": per_s,
        "ratio_ours_over_torch": per_s["ours"] / per_s["torch"],
        "paired_ratio_ours_over_torch": 1 / paired_ratio(times["ours"], times["torch"]),
        "ratio_ours_no_cache_over_torch": per_s["ours_no_cache"] / per_s["torch"],
        "batch_times_s": {k: [t for _, t in v] for k, v in times.items()},
        "bleu": bleu,
        "same_output_as_ours": {**same, "of": len(english)},
    }
    for key, (label, _) in contenders.items():
        print(
            f"  {label:50s} {totals[key]:8.2f} s  {per_s[key]:7.2f} sentences/s  "
            f"BLEU {bleu[key]:.2f}",
            flush=True,
        )
    print(
        f"  ours / torch: {result['ratio_ours_over_torch']:.2f}x (paired "
        f"{result['paired_ratio_ours_over_torch']:.2f}x); ours without cache / torch: "
        f"{result['ratio_ours_no_cache_over_torch']:.2f}x; same output as ours: {same}",
        flush=True,
    )
    return result


# -- plot --------------------------------------------------------------------------------------


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    meta = payload["meta"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (loss_ax, train_ax), (decode_ax, translate_ax) = axes

    training = payload.get("training")
    if training:
        styles = {"dropout_0.1": ("tab:blue", "tab:orange"), "dropout_0": ("navy", "darkred")}
        for run_key, run in training["runs"].items():
            colour_ours, colour_torch = styles.get(run_key, ("black", "grey"))
            steps = range(1, run["steps"] + 1)
            name = run_key.replace("_", " ")
            loss_ax.plot(steps, run["losses"]["ours"], color=colour_ours, label=f"ours, {name}")
            loss_ax.plot(
                steps,
                run["losses"]["torch"],
                color=colour_torch,
                linestyle="--",
                label=f"torch, {name}",
            )
        diff = training["loss_curves_dropout0_max_abs_difference"]
        precision = "bf16 autocast" if training["config"].get("autocast") else "fp32"
        title = (
            f"training loss, same weights and batches\ndropout 0: max |Δ| {diff:.1e} in {precision}"
        )
        exact64 = training.get("float64_check")
        if exact64:
            title += (
                f", {exact64['max_abs_loss_difference']:.0e} in fp64 ({exact64['steps']} steps)"
            )
        loss_ax.set_title(title, fontsize=10)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("label-smoothed cross-entropy")
        loss_ax.grid(True, alpha=0.3)
        exact = training["runs"].get("dropout_0")
        if exact:  # how far apart the dropout-0 curves are, on a log axis of its own
            gap_ax = loss_ax.twinx()
            gaps = [
                max(abs(a - b), 1e-9)
                for a, b in zip(exact["losses"]["ours"], exact["losses"]["torch"], strict=True)
            ]
            gap_ax.plot(range(1, len(gaps) + 1), gaps, color="grey", linewidth=0.8, alpha=0.7)
            gap_ax.set_yscale("log")
            gap_ax.set_ylabel(
                "|loss ours − loss torch|, dropout 0 (grey, log; 0 at 1e-9)", fontsize=8
            )
            loss_ax.plot([], [], color="grey", linewidth=0.8, label="|difference|, dropout 0")
        loss_ax.legend(fontsize=8, loc="lower left")

        labels, ours, theirs = [], [], []
        for run_key, run in training["runs"].items():
            labels.append(run_key.replace("_", " "))
            ours.append(run["tokens_per_s"]["ours"])
            theirs.append(run["tokens_per_s"]["torch"])
        x = range(len(labels))
        train_ax.bar([i - 0.2 for i in x], ours, 0.4, label="Seq2SeqTransformer (ours)")
        train_ax.bar([i + 0.2 for i in x], theirs, 0.4, label="torch.nn.Transformer")
        for i, run in enumerate(training["runs"].values()):
            top = max(ours[i], theirs[i])
            train_ax.text(i, top * 1.02, f"{run['ratio_ours_over_torch']:.2f}×", ha="center")
        train_ax.set_xticks(list(x), labels)
        train_ax.set_ylabel("target tokens / s (higher is better)")
        train_ax.set_title(f"training throughput, max_tokens {MAX_TOKENS} (ratio ours / torch)")
        train_ax.set_ylim(0, 1.3 * max(ours + theirs))
        train_ax.legend(fontsize=8, loc="upper center", ncols=2)
    else:
        loss_ax.set_axis_off(), train_ax.set_axis_off()

    decoding = payload.get("decoding")
    if decoding:
        keys = list(decoding["contenders"])
        values = [decoding["ms_per_token"][k] for k in keys]
        bars = decode_ax.bar(
            [f"({k}) {decoding['contenders'][k]}" for k in keys],
            values,
            color=["tab:blue", "tab:red", "tab:green"],
        )
        for bar, value in zip(bars, values, strict=True):
            decode_ax.text(
                bar.get_x() + bar.get_width() / 2, value * 1.05, f"{value:.2f}", ha="center"
            )
        decode_ax.set_yscale("log")
        decode_ax.set_ylim(min(values) / 3, max(values) * 3)
        decode_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        decode_ax.yaxis.set_minor_formatter(NullFormatter())
        decode_ax.set_ylabel("ms per generated token (log, lower is better)")
        cfg = decoding["config"]
        decode_ax.set_title(
            f"TransformerLM {cfg['d_model']}/{cfg['num_heads']}h/{cfg['num_layers']}L, batch 1: "
            f"{cfg['new_tokens']} tokens after {cfg['prompt']}\n(a) is "
            f"{decoding['speedup_a_over_b']:.1f}× faster than (b), "
            f"{decoding['speedup_a_over_c']:.2f}× than (c)",
            fontsize=10,
        )
        decode_ax.tick_params(axis="x", labelsize=8)
    else:
        decode_ax.set_axis_off()

    translation = payload.get("translation")
    if translation:
        keys = list(translation["contenders"])
        values = [translation["sentences_per_s"][k] for k in keys]
        names = {
            "ours": "ours (cache)",
            "torch": "torch (no cache)",
            "ours_no_cache": "ours (no cache)",
        }
        bars = translate_ax.bar(
            [names.get(k, k) for k in keys], values, color=["tab:blue", "tab:orange", "lightblue"]
        )
        for bar, value in zip(bars, values, strict=True):
            translate_ax.text(
                bar.get_x() + bar.get_width() / 2, value * 1.01, f"{value:.1f}", ha="center"
            )
        translate_ax.set_ylim(0, 1.15 * max(values))
        translate_ax.set_ylabel("sentences / s (higher is better)")
        translate_ax.set_title(
            f"greedy translation, {translation['sentences']} test sentences, "
            f"{translation['model'].split(':')[0]} model\nours / torch "
            f"{translation['ratio_ours_over_torch']:.2f}×",
            fontsize=10,
        )
    else:
        translate_ax.set_axis_off()

    fig.suptitle(
        f"multihead {meta['multihead']} vs torch.nn.Transformer: fp32, {meta['threads']} threads, "
        f"torch {meta['torch']}, {meta['cpu']}" + (" (quick)" if meta["quick"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(stem: Path) -> None:
    plot(json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.png')}")


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--sentences", type=int, help="test sentences to translate (spread)")
    parser.add_argument("--out", type=Path, help="output stem (default results/seq2seq[_quick])")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="training under bfloat16 autocast, as the translation recipe (results/seq2seq_bf16)",
    )
    args = parser.parse_args(argv)
    name = "seq2seq" + ("_bf16" if args.bf16 else "") + ("_quick" if args.quick else "")
    stem = args.out or RESULTS / name
    if args.replot:
        replot(stem)
        return

    torch.set_num_threads(THREADS)
    stem.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "benchmark": "seq2seq",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "multihead": multihead.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "dtype": "float32, training under bfloat16 autocast" if args.bf16 else "float32",
        "quick": args.quick,
        "load_average_start": load_average(),
        "multihead_source_sha256": source_digest(),
    }
    print(
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}, load {meta['load_average_start']}",
        flush=True,
    )
    payload: dict[str, Any] = {"meta": meta}
    if "training" in args.parts:
        steps = args.steps or (QUICK_TRAIN_STEPS if args.quick else TRAIN_STEPS)
        float64_steps = min(steps, QUICK_FLOAT64_STEPS if args.quick else FLOAT64_STEPS)
        # The float64 check asks whether the two models are one function: bf16 does not change it.
        payload["training"] = bench_training(steps, 0 if args.bf16 else float64_steps, args.bf16)
    if "decoding" in args.parts:
        if args.quick:
            payload["decoding"] = bench_decoding(
                QUICK_PROMPT, QUICK_NEW_TOKENS, QUICK_DECODE_ROUNDS, 1
            )
        else:
            payload["decoding"] = bench_decoding(
                PROMPT, NEW_TOKENS, DECODE_ROUNDS, RECOMPUTE_REPEATS
            )
    if "translation" in args.parts:
        sentences = args.sentences or (QUICK_SENTENCES if args.quick else None)
        payload["translation"] = bench_translation(sentences)

    headline: dict[str, Any] = {}
    if "training" in payload:
        t = payload["training"]
        headline["training_tokens_per_s_ours_over_torch"] = t["ratio_ours_over_torch"]
        headline["training_target_met"] = t["target_met"]
        headline["loss_curves_dropout0_max_abs_difference"] = t[
            "loss_curves_dropout0_max_abs_difference"
        ]
    if "decoding" in payload:
        d = payload["decoding"]
        headline["decoding_preallocated_over_recompute"] = d["speedup_a_over_b"]
        headline["decoding_preallocated_over_cat"] = d["speedup_a_over_c"]
        headline["decoding_targets_met"] = d["targets"]
    if "translation" in payload:
        headline["translation_sentences_per_s_ours_over_torch"] = payload["translation"][
            "ratio_ours_over_torch"
        ]
    meta["load_average_end"] = load_average()
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    payload = {
        "meta": meta,
        "headline": headline,
        **{k: v for k, v in payload.items() if k != "meta"},
    }
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, png_path)
    print("\n" + json.dumps(headline, indent=2))
    print(f"wrote {json_path} and {png_path} ({meta['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
