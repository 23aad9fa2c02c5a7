"""Train the CTC speech encoder on synthesised FSDD digit strings.

    python -m multihead.apps.speech.train --minutes 20 --run-dir runs/speech

Every training batch is made fresh: utterances of 1-7 training recordings (plus, with
``--espeak N`` and ``--flite N``, synthetic speakers of espeak-ng and flite), some clips with
noisy untrimmed-looking margins, then speed perturbation, log-mel with VTLP-warped filters,
and SpecAugment. The augmentations start off and ramp up over ``--aug-ramp`` updates: on
clean data CTC leaves its all-blank plateau sooner. Over the last ``--average-fraction`` of
the run the weights are averaged; the average replaces the final weights if it does no worse
on fresh utterances made from the training recordings (the test sets play no part in the
choice). At the end the model is saved (safetensors + JSON) to ``RUN/model`` and scored on
the test recordings and the unseen speaker, greedy and beam; the numbers go to
``RUN/metrics.json``, the curves to ``RUN/log.jsonl`` and ``RUN/curves.png``; ``RUN/model``
gets copies of them (``results.json``, ``train_log.jsonl``, ``curves.png``) beside the weights.

Under ``torchrun --nproc-per-node N`` every process makes each whole global batch (so the
augmentation draws are those of one process) and trains on its utterances of it; rank 0 alone
fills the synthetic speakers' cache, evaluates and writes the files.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ...attention_config import AttentionConfig
from ...models.speech import SpeechEncoder, SpeechEncoderConfig, ctc_loss
from ...training import WeightAverage
from ...training import distributed as dist
from .. import common, limits
from ..common import Defaults
from . import espeak, flite
from .augment import AugmentConfig, spec_augment, speed_perturb
from .data import (
    UNSEEN_SPEAKER,
    Clip,
    SynthConfig,
    Utterance,
    UtteranceSampler,
    eval_set,
    load_clips,
    split,
)
from .decode import digits_to_tokens
from .evaluate import EVAL_SEEDS, feature_config_of, pad_waves, score, transcribe
from .evaluate import word_error_rate as wer
from .features import FeatureConfig, log_mel

__all__ = [
    "SpeechBatch",
    "augment_config",
    "build_model_config",
    "build_parser",
    "main",
    "make_batch",
    "shard",
]


@dataclass
class SpeechBatch:
    feats: Tensor  # (batch, frames, n_mels)
    frames: Tensor  # (batch,)
    targets: Tensor  # concatenated token ids
    target_lengths: Tensor  # (batch,)


def make_batch(
    utterances: Sequence[Utterance],
    features: FeatureConfig,
    augment: AugmentConfig | None = None,
    rng: np.random.Generator | None = None,
    generator: torch.Generator | None = None,
) -> SpeechBatch:
    """Features and CTC targets for ``utterances``, augmented when ``augment`` is given."""
    rng = rng or np.random.default_rng(0)
    generator = generator or torch.Generator().manual_seed(0)
    waves = [u.wave for u in utterances]
    n = len(waves)
    if augment is not None and augment.speed is not None:
        hit = rng.random(n) < augment.speed_chance
        factors = np.where(hit, rng.uniform(*augment.speed, n), 1.0)
        waves = [
            w if f == 1.0 else speed_perturb(w, f) for w, f in zip(waves, factors, strict=True)
        ]
    batch, lengths = pad_waves(waves)
    warps = None
    if augment is not None and augment.vtlp is not None:
        alphas = np.where(rng.random(n) < augment.prob, rng.uniform(*augment.vtlp, n), 1.0)
        warps = torch.from_numpy(alphas)
    feats, frames = log_mel(batch, lengths, features, warps)
    if augment is not None and augment.spec_augment:
        select = (rng.random(n) < augment.prob).tolist()
        feats = spec_augment(feats, frames, augment, generator, select)
    tokens = [digits_to_tokens(u.digits) for u in utterances]
    targets = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
    return SpeechBatch(feats, frames, targets, torch.tensor([len(t) for t in tokens]))


def shard(batch: SpeechBatch) -> SpeechBatch:
    """This process's utterances of a global batch, with their stretch of the targets."""
    index = dist.rows(torch.arange(len(batch.frames)))
    ends = batch.target_lengths.cumsum(0)
    first, last = int(index[0]), int(index[-1])
    start = int(ends[first] - batch.target_lengths[first])
    return SpeechBatch(
        feats=batch.feats[first : last + 1],
        frames=batch.frames[first : last + 1],
        targets=batch.targets[start : int(ends[last])],
        target_lengths=batch.target_lengths[first : last + 1],
    )


def prefetch(items: Iterator[SpeechBatch], depth: int = 3) -> Iterator[SpeechBatch]:
    """Make the next batches in a background thread while the caller trains on this one.

    numpy's FFTs and torch's STFT release the GIL, so building batches overlaps with the
    training step; the order of the batches, and so the run, is unchanged.
    """
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item = slots.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()


class TrainingBatches:
    """``batches(epoch)`` for the Trainer: a deterministic function of the epoch number."""

    def __init__(
        self,
        clips: list[Clip],
        synthetic: list[Clip],
        features: FeatureConfig,
        augment: AugmentConfig | None,
        batch_size: int,
        steps_per_epoch: int,
        synthetic_fraction: float,
        seed: int,
        ramp_steps: int = 0,
        synth: SynthConfig | None = None,
    ) -> None:
        self.clips, self.synthetic = clips, synthetic
        self.features, self.augment = features, augment
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.synthetic_fraction = synthetic_fraction if synthetic else 0.0
        self.seed = seed
        self.ramp_steps = ramp_steps
        self.synth = synth or SynthConfig()

    def augment_at(self, step: int) -> AugmentConfig | None:
        """The augmentation for update ``step``: its probability grows linearly over the ramp."""
        if self.augment is None or step >= self.ramp_steps:
            return self.augment
        return self.augment.scaled(step / self.ramp_steps)

    def __call__(self, epoch: int) -> Iterator[SpeechBatch]:
        return prefetch(self._batches(epoch))

    def _batches(self, epoch: int) -> Iterator[SpeechBatch]:
        seed = self.seed * 1_000_003 + epoch
        real = UtteranceSampler(self.clips, self.synth, seed=seed)
        fake = UtteranceSampler(self.synthetic, self.synth, seed + 1) if self.synthetic else None
        rng = np.random.default_rng(seed + 2)
        generator = torch.Generator().manual_seed(seed + 3)
        # Bucketing: draw several batches' worth, sort by length, cut, shuffle the batches;
        # padding then wastes little compute (utterances run from 0.5 s to 5 s).
        pool = 8
        step = epoch * self.steps_per_epoch
        for _ in range(self.steps_per_epoch // pool):
            utterances = [
                fake.sample() if fake and rng.random() < self.synthetic_fraction else real.sample()
                for _ in range(self.batch_size * pool)
            ]
            utterances.sort(key=lambda u: len(u.wave))
            for i in rng.permutation(pool):
                chunk = utterances[i * self.batch_size : (i + 1) * self.batch_size]
                yield make_batch(chunk, self.features, self.augment_at(step), rng, generator)
                step += 1


def choose_average(
    model: SpeechEncoder, average: WeightAverage, held_out: Sequence[Utterance]
) -> str:
    """Load the averaged weights into ``model`` if they do no worse than the final ones on
    ``held_out`` (fresh utterances of training recordings, never the test sets). Returns
    which weights it kept."""
    if average.count < 2:
        return "final"
    refs = [u.text for u in held_out]
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    final_wer = wer(refs, transcribe(model, held_out))
    model.load_state_dict(average.state_dict())
    if wer(refs, transcribe(model, held_out)) <= final_wer:
        return f"average of {average.count}"
    model.load_state_dict(final_state)
    return "final"


EVAL_SIZE = limits.bounded_int(1, limits.MAX_UTTERANCES, "utterances held in memory")
PROG = "python -m multihead.apps.speech.train"  # `multihead train` passes its own usage name
DEFAULTS = Defaults(
    run_dir="runs/speech",
    model_dir=None,  # the model goes to RUN/model
    minutes=20.0,
    threads=2,
    lr=2.5e-3,
    warmup=300,
    eval_every=400,
    d_model=144,
    heads=4,
    ff=576,
    dropout=0.1,
    average_fraction=0.25,
    average_every=25,
)


def share(text: str) -> float:
    """An argparse type: a probability in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The shared training flags (`common`) and the speech app's own."""
    summary = (__doc__ or "").split("\n\n")[0]
    p = common.build_parser(prog, summary, DEFAULTS)
    own = p.add_argument_group("speech")
    arg = own.add_argument
    arg("--batch-size", type=limits.bounded_int(1, 1024, "a batch of utterances"), default=32)
    arg("--layers", type=int, default=4)
    arg("--conv-channels", type=int, default=64)
    arg("--n-mels", type=int, default=40, choices=(40, 80))
    arg("--positions", default="rope", choices=("sinusoidal", "rope", "relative", "alibi"),
        help="absolute sinusoids added to the input, or relative positions in every "
        "attention layer instead")  # fmt: skip
    arg("--conv-kernel", type=int, default=0, metavar="K",
        help="a Conformer convolution module of kernel K after every layer (0: none)")  # fmt: skip
    arg("--no-speed", action="store_true", help="no speed perturbation")
    arg("--no-vtlp", action="store_true", help="no vocal tract length perturbation")
    arg("--no-specaug", action="store_true", help="no SpecAugment masks")
    arg("--speed-range", type=float, nargs=2, default=(0.8, 1.25), metavar=("LO", "HI"),
        help="speed perturbation factors, drawn uniformly")  # fmt: skip
    arg("--vtlp-range", type=float, nargs=2, default=(0.85, 1.15), metavar=("LO", "HI"),
        help="VTLP warp factors, drawn uniformly")  # fmt: skip
    arg("--freq-masks", type=int, default=2, help="SpecAugment mel-band masks per utterance")
    arg("--freq-width", type=int, default=8, help="widest mel-band mask (bins)")
    arg("--time-masks", type=int, default=2, help="SpecAugment time masks per utterance")
    arg("--time-width", type=int, default=8, help="widest time mask (frames)")
    arg("--time-ratio", type=float, default=0.15, help="most of an utterance time masks cover")
    arg("--margin-prob", type=share, default=0.5, help="chance a clip gets noisy margins")
    arg("--aug-prob", type=share, default=0.5, help="chance each augmentation hits an utterance")
    arg("--speed-prob", type=share, default=1.0,
        help="chance of speed perturbation (the other augmentations: --aug-prob)")  # fmt: skip
    arg("--aug-ramp", type=int, default=500, help="updates over which aug-prob rises from 0")
    arg("--espeak", type=int, default=40, metavar="N", help="add N espeak-ng speakers (0: off)")
    flite_count = limits.bounded_int(0, flite.MAX_SPEAKERS, "flite's voices would repeat")
    arg("--flite", type=flite_count, default=40, metavar="N", help="add N flite speakers (0: off)")
    arg("--synthetic-fraction", "--espeak-fraction", dest="synthetic_fraction", type=share,
        default=0.3, help="share of utterances from the synthetic speakers")  # fmt: skip
    arg("--synthetic-cache", "--espeak-cache", dest="synthetic_cache", default="runs/espeak-cache",
        help="where the synthesised audio is kept")  # fmt: skip
    arg("--unseen-speaker", default=UNSEEN_SPEAKER)
    arg("--eval-size", type=EVAL_SIZE, default=300, help="utterances per final evaluation set")
    arg("--beam", type=limits.BEAM, default=8)
    return p


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """The training augmentation the flags ask for."""
    return AugmentConfig(
        speed=None if args.no_speed else tuple(args.speed_range),
        vtlp=None if args.no_vtlp else tuple(args.vtlp_range),
        spec_augment=not args.no_specaug,
        freq_masks=args.freq_masks,
        freq_width=args.freq_width,
        time_masks=args.time_masks,
        time_width=args.time_width,
        time_ratio=args.time_ratio,
        prob=args.aug_prob,
        speed_prob=args.speed_prob,
    )


def build_model_config(args: argparse.Namespace) -> SpeechEncoderConfig:
    """The model the flags ask for. ``--positions`` other than sinusoidal puts relative
    positions in every attention layer and leaves the input's sinusoids out."""
    absolute = args.positions == "sinusoidal"
    return SpeechEncoderConfig(
        n_mels=args.n_mels,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        dim_feedforward=args.ff,
        dropout=args.dropout,
        conv_channels=args.conv_channels,
        attention=None if absolute else AttentionConfig(positions=args.positions),
        absolute_positions=absolute,
        conv_kernel=args.conv_kernel,
    )


def synthetic_speakers(args: argparse.Namespace, main_process: bool) -> list[Clip]:
    """The clips of the ``--espeak`` and ``--flite`` speakers (none where the synthesiser is
    missing, with a message). Rank 0 makes them and fills the cache; the others then read it."""

    def make() -> list[Clip]:
        clips: list[Clip] = []
        for engine, count in ((espeak, args.espeak), (flite, args.flite)):
            if not count:
                continue
            name = engine.__name__.rsplit(".", 1)[-1]
            try:
                tick = time.monotonic()
                made = engine.synthetic_clips(count, args.seed, args.synthetic_cache)
            except espeak.SynthesiserUnavailable as error:
                if main_process:
                    print(f"skipping the {name} speakers: {error}")
                continue
            if main_process:
                print(f"{name}: {count} synthetic speakers, {len(made)} clips "
                      f"in {time.monotonic() - tick:.1f} s")  # fmt: skip
            clips += made
        return clips

    clips = make() if main_process else []
    dist.barrier()
    return clips if main_process else make()


def main(
    argv: Sequence[str] | None = None,
    *,
    build_model: Callable[[SpeechEncoderConfig], SpeechEncoder] = SpeechEncoder,
    prog: str = PROG,
) -> int:
    """Train, choose the weights, save and score. ``build_model`` makes the model from its
    config (the benchmarks pass a twin whose encoder is ``torch.nn.TransformerEncoder``)."""
    args = common.parse_args(build_parser(prog), argv, DEFAULTS)
    main_process = common.start(args)
    run_dir = args.run_dir
    model_config = build_model_config(args)
    features = feature_config_of(model_config)
    augment = augment_config(args)

    parts = split(load_clips(), args.unseen_speaker)
    synthetic = synthetic_speakers(args, main_process)

    # Small fixed sets to draw the curves; the final numbers use the full sets below.
    monitor = {name: eval_set(parts[name], 100, seed) for name, seed in EVAL_SEEDS.items()}
    monitor["train"] = eval_set(parts["train"], 100, seed=3003)

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        assert isinstance(model, SpeechEncoder)
        return {
            f"{name}_wer": 100 * wer([u.text for u in utts], transcribe(model, utts))
            for name, utts in monitor.items()
        }

    def loss_fn(part: tuple[SpeechBatch, int]) -> tuple[Tensor, dict[str, float]]:
        batch, total = part
        # The forward goes through the DDP wrapper, so not SpeechEncoder.ctc_loss.
        loss = ctc_loss(*net(batch.feats, batch.frames), batch.targets, batch.target_lengths)
        loss = loss * dist.mean_share(len(batch.frames), total)  # the global batch's mean
        return loss, {"frames": float(batch.frames.sum())}

    limits.check_model_fits(build_model, model_config)
    torch.manual_seed(args.seed)
    model = build_model(model_config)
    net = dist.wrap(model)  # DDP under torchrun: the forward that averages the gradients
    batches = TrainingBatches(
        parts["train"],
        synthetic,
        features,
        augment,
        args.batch_size,
        steps_per_epoch=512,
        synthetic_fraction=args.synthetic_fraction,
        seed=args.seed,
        ramp_steps=args.aug_ramp,
        synth=SynthConfig(margin_prob=args.margin_prob),
    )

    def shards(epoch: int) -> Iterator[tuple[SpeechBatch, int]]:
        return ((shard(batch), len(batch.frames)) for batch in batches(epoch))

    average = common.weight_average(model, args)
    trainer = common.build_trainer(
        args,
        net,
        loss_fn,
        shards,
        evaluate=evaluate,
        log_every=25,
        rate_key="frames",
        average=average,
    )
    result = trainer.train()
    if not main_process:
        return 0

    tick = time.monotonic()
    sets = {name: eval_set(parts[name], args.eval_size, seed) for name, seed in EVAL_SEEDS.items()}
    model.eval()
    final_scores = score(model, sets, (None, args.beam))
    chosen = choose_average(model, average, eval_set(parts["train"], args.eval_size, seed=4004))
    model.save_pretrained(run_dir / "model")
    metrics = {
        "steps": result.step,
        "train_seconds": round(result.elapsed_seconds, 1),
        "final_loss": result.final_loss,
        "weights": chosen,
        **(final_scores if chosen == "final" else score(model, sets, (None, args.beam))),
        "final_weights": final_scores,
        "eval_seconds": round(time.monotonic() - tick, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "augment": asdict(augment),
        "margin_prob": args.margin_prob,
        "espeak_speakers": len({c.speaker for c in synthetic if c.speaker.startswith("espeak")}),
        "flite_speakers": len({c.speaker for c in synthetic if c.speaker.startswith("flite")}),
        "args": common.record(args),
    }
    common.write_results(args, metrics, run_dir / "model")
    summary = {k: v for k, v in metrics.items() if "wer" in k}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
