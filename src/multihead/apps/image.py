"""Image recognition: a Vision Transformer on scikit-learn's 8×8 handwritten digits.

    python -m multihead.apps.image --minutes 5

The 1,797 digits ship with scikit-learn, so nothing is downloaded. A fixed stratified split
(360 test images by default) is shared by the ViT and by the baseline it has to match, an
RBF support vector machine (scikit-learn's ``SVC``) trained on the same training images in
the same run. With 1,437 training images a Transformer has to be shown many variants of
each digit: every epoch draws a fresh small shift and rotation of every image.

The ViT is scored twice: on the test images as they are, and with test-time augmentation
(the mean prediction over the image and its four one-pixel shifts), which evens out its
sensitivity to where a stroke falls on the 2×2 patch grid. Test images are scored only at the
end and in the curves; no checkpoint is chosen by them.

Under ``torchrun --nproc-per-node N`` each process trains on its rows of every global batch
of ``--batch-size`` images (the same batches as one process), and rank 0 alone scores the
model and writes the files.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vit import ViT, ViTConfig
from ..training import distributed as dist
from . import common, limits
from .common import Defaults

__all__ = [
    "DigitsSplit",
    "accuracy",
    "augment",
    "build_parser",
    "epoch_batches",
    "load_split",
    "main",
    "predict",
    "shift_pixels",
    "svc_baselines",
]

NUM_DIGITS = 1797
PIXEL_MAX = 16.0  # load_digits pixels are counts 0..16 of a 4×4 block of a 32×32 bitmap


@dataclass
class DigitsSplit:
    """Images (n, 1, 8, 8) scaled to [0, 1] (background 0), labels (n,) as int64, and each
    image's index in ``load_digits()``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    train_index: Tensor
    test_index: Tensor
    seed: int


def load_split(test_size: int = 360, seed: int = 0) -> DigitsSplit:
    """scikit-learn's digits, split once, stratified by class, reproducibly from ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(test_size, bool) or not isinstance(test_size, int):
        raise TypeError(f"test_size must be an int, got {type(test_size).__name__}")
    if not 10 <= test_size <= NUM_DIGITS - 10:
        raise ValueError(f"test_size must be in [10, {NUM_DIGITS - 10}], got {test_size}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=digits.target, random_state=seed
    )
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return DigitsSplit(images[train], labels[train], images[test], labels[test], train, test, seed)


def augment(
    images: Tensor,
    generator: torch.Generator,
    max_shift: float = 1.0,
    max_rotation: float = 10.0,
    whole_pixels: bool = False,
) -> Tensor:
    """Each image shifted by up to ``max_shift`` pixels and rotated by up to ``max_rotation``
    degrees about its centre (uniformly at random), resampled bilinearly; outside is 0.
    ``whole_pixels`` draws shifts from the integers, which resampling leaves unblurred."""
    if images.ndim != 4:
        raise ValueError(f"images must be (batch, channels, H, W), got {tuple(images.shape)}")
    if max_shift < 0 or max_rotation < 0:
        raise ValueError(
            f"max_shift and max_rotation must be >= 0, got {max_shift}, {max_rotation}"
        )
    n, _, height, width = images.shape

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(n) * math.radians(max_rotation)
    # affine_grid works in [-1, 1] coordinates, where one pixel is 2 / size wide.
    if whole_pixels:
        steps = int(max_shift)
        shift = torch.randint(-steps, steps + 1, (n, 2), generator=generator).float()
    else:
        shift = uniform(n, 2) * max_shift
    shift = shift * torch.tensor([2 / width, 2 / height])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def epoch_batches(
    images: Tensor,
    labels: Tensor,
    epoch: int,
    *,
    batch_size: int,
    seed: int,
    max_shift: float,
    max_rotation: float,
    whole_pixels: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """One epoch of augmented, shuffled batches; a function of (seed, epoch) alone, so a
    resumed run sees the same data (the Trainer's contract)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(labels), generator=generator)
    varied = augment(images[order], generator, max_shift, max_rotation, whole_pixels)
    return list(zip(varied.split(batch_size), labels[order].split(batch_size), strict=True))


# Test-time augmentation: the image and its four one-pixel shifts. Whole-pixel moves need no
# resampling, so every view is as sharp as the original.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def shift_pixels(images: Tensor, dx: int, dy: int) -> Tensor:
    """(batch, channels, H, W) moved ``dx`` pixels right and ``dy`` down; the gap is 0."""
    height, width = images.shape[-2:]
    if abs(dx) >= width or abs(dy) >= height:
        raise ValueError(f"shift ({dx}, {dy}) must be smaller than the image ({height}×{width})")
    p = max(abs(dx), abs(dy))
    padded = F.pad(images, (p, p, p, p))
    return padded[..., p - dy : p - dy + height, p - dx : p - dx + width]


@torch.no_grad()
def predict(
    model: nn.Module, images: Tensor, *, tta: bool = False, batch_size: int = 512
) -> Tensor:
    """Class log-probabilities (n, classes) in eval mode; with ``tta`` the mean over the
    image and its four one-pixel shifts (a small ensemble that costs only inference)."""
    was_training = model.training
    model.eval()
    shifts = TTA_SHIFTS if tta else TTA_SHIFTS[:1]
    out = torch.cat(
        [
            torch.stack([model(shift_pixels(x, dx, dy)).log_softmax(-1) for dx, dy in shifts]).mean(
                0
            )
            for x in images.split(batch_size)
        ]
    )
    model.train(was_training)
    return out


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, tta: bool = False) -> float:
    """Fraction of ``images`` whose most likely class is the label."""
    return float((predict(model, images, tta=tta).argmax(-1) == labels).float().mean())


def svc_baselines(split: DigitsSplit) -> dict[str, float]:
    """Test accuracy of RBF SVMs on the raw pixels (0..16) of the same training images:
    scikit-learn's default (gamma='scale') and gamma=0.001 (its digits example)."""
    from sklearn.svm import SVC

    def pixels(images: Tensor) -> np.ndarray:
        return (images.flatten(1) * PIXEL_MAX).numpy()

    x_train, y_train = pixels(split.train_images), split.train_labels.numpy()
    x_test, y_test = pixels(split.test_images), split.test_labels.numpy()
    return {
        f"svc_{name}": float(SVC(gamma=gamma).fit(x_train, y_train).score(x_test, y_test))
        for name, gamma in (("gamma_scale", "scale"), ("gamma_0.001", 0.001))
    }


PROG = "python -m multihead.apps.image"  # `multihead train` passes its own usage name
DEFAULTS = Defaults(
    run_dir="runs/image-digits",
    model_dir="models/image-digits",
    minutes=5.0,
    threads=1,  # 1 is fastest on a busy box
    lr=3e-3,
    warmup=100,
    eval_every=250,
    d_model=64,
    heads=4,
    ff=128,
    dropout=0.0,
    weight_decay=0.05,
)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The shared training flags (`common`) and the image app's own."""
    p = common.build_parser(
        prog,
        "Train a ViT on scikit-learn's 8×8 digits and compare it with an RBF SVM.",
        DEFAULTS,
    )
    own = p.add_argument_group("image")
    arg = own.add_argument
    arg("--no-save", action="store_true", help="do not write --model-dir")
    arg("--test-size", type=int, default=360)
    arg("--split-seed", type=int, default=0, help="seed of the train/test split")
    arg("--batch-size", type=limits.bounded_int(1, 4096, "a batch of images"), default=64)
    arg("--label-smoothing", type=float, default=0.1)
    arg("--max-shift", type=float, default=1.0, help="pixels")
    arg("--max-rotation", type=float, default=10.0, help="degrees")
    arg("--whole-pixel-shifts", action="store_true", help="shift by whole pixels only")
    arg("--patch-size", type=int, default=2)
    arg("--patch-kernel", type=int, default=3, help="> patch size: overlapping patches")
    arg("--layers", type=int, default=4)
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    build_model: Callable[[ViTConfig], nn.Module] = ViT,
    prog: str = PROG,
) -> int:
    """Train and score the ViT and the SVCs. ``build_model`` makes the model from its config
    (the benchmarks pass a twin whose encoder is ``torch.nn.TransformerEncoder``)."""
    args = common.parse_args(build_parser(prog), argv, DEFAULTS)
    main_process = common.start(args)
    config = ViTConfig(
        patch_size=args.patch_size,
        patch_kernel=args.patch_kernel if args.patch_kernel != args.patch_size else None,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        dim_feedforward=args.ff,
        dropout=args.dropout,
    )
    split = load_split(args.test_size, args.split_seed)

    tick = time.monotonic()
    baselines = svc_baselines(split) if main_process else {}
    svc_seconds = time.monotonic() - tick

    limits.check_model_fits(build_model, config)
    torch.manual_seed(args.seed)
    model = build_model(config)
    net = dist.wrap(model)  # DDP under torchrun: the forward that averages the gradients

    def batches(epoch: int) -> list[tuple[Tensor, Tensor, int]]:
        """This process's rows of each global batch, and the global batch's size."""
        full = epoch_batches(
            split.train_images,
            split.train_labels,
            epoch,
            batch_size=args.batch_size,
            seed=args.seed,
            max_shift=args.max_shift,
            max_rotation=args.max_rotation,
            whole_pixels=args.whole_pixel_shifts,
        )
        return [(dist.rows(images), dist.rows(labels), len(labels)) for images, labels in full]

    def loss_fn(batch: tuple[Tensor, Tensor, int]) -> tuple[Tensor, dict[str, float]]:
        images, labels, total = batch
        logits = net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
        loss = loss * dist.mean_share(len(labels), total)
        return loss, {"acc": float((logits.argmax(-1) == labels).float().mean())}

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        return {
            "train_acc": accuracy(model, split.train_images, split.train_labels),
            "test_acc": accuracy(model, split.test_images, split.test_labels),
            "test_acc_tta": accuracy(model, split.test_images, split.test_labels, tta=True),
            "test_loss": float(F.cross_entropy(model(split.test_images), split.test_labels)),
        }

    trainer = common.build_trainer(args, net, loss_fn, batches, evaluate=evaluate, log_every=25)
    result = trainer.train()
    if not main_process:
        return 0

    test_acc = accuracy(model, split.test_images, split.test_labels)
    tta_acc = accuracy(model, split.test_images, split.test_labels, tta=True)
    metrics = {
        "vit_test_accuracy": test_acc,
        "vit_tta_test_accuracy": tta_acc,
        **baselines,
        "test_images": len(split.test_labels),
        "train_images": len(split.train_labels),
        "train_minutes": round(result.elapsed_seconds / 60, 2),
        "svc_seconds": round(svc_seconds, 2),
        "steps": result.step,
        "epochs": result.epoch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": asdict(config),
        "args": common.record(args),
    }
    if not args.no_save:
        model.save_pretrained(args.model_dir)
    common.write_results(args, metrics, None if args.no_save else args.model_dir)
    print(
        f"ViT test accuracy {100 * test_acc:.2f}%, {100 * tta_acc:.2f}% with test-time shifts "
        f"({len(split.test_labels)} test images, split seed {split.seed})\n"
        f"SVC (RBF, gamma='scale') {100 * baselines['svc_gamma_scale']:.2f}%, "
        f"SVC (RBF, gamma=0.001) {100 * baselines['svc_gamma_0.001']:.2f}%\n"
        f"training {metrics['train_minutes']:.2f} min ({result.step} updates, "
        f"{result.epoch} epochs); metrics in {args.run_dir / 'metrics.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
