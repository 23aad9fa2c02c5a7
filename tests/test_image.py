"""The digits ViT: data split, augmentation, model shapes, a few training steps, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multihead.apps.image import (
    accuracy,
    augment,
    epoch_batches,
    load_split,
    predict,
    shift_pixels,
)
from multihead.models import ViT, ViTConfig
from multihead.transformer import EncoderLayer

TINY = ViTConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32)


@pytest.fixture(scope="module")
def split():
    return load_split(test_size=360, seed=0)


def test_split_is_stratified_disjoint_and_fixed(split) -> None:
    assert len(split.test_labels) >= 360
    assert len(split.train_labels) + len(split.test_labels) == 1797
    train, test = set(split.train_index.tolist()), set(split.test_index.tolist())
    assert not train & test and len(train | test) == 1797
    train_share = torch.bincount(split.train_labels, minlength=10) / len(split.train_labels)
    test_share = torch.bincount(split.test_labels, minlength=10) / len(split.test_labels)
    assert (train_share - test_share).abs().max() < 0.01
    again = load_split(test_size=360, seed=0)
    assert torch.equal(again.test_labels, split.test_labels)
    assert torch.equal(again.test_images, split.test_images)
    assert split.train_images.shape[1:] == (1, 8, 8)
    assert float(split.train_images.min()) >= 0.0 and float(split.train_images.max()) <= 1.0


def test_load_split_rejects_bad_test_size() -> None:
    with pytest.raises(ValueError, match="test_size"):
        load_split(test_size=5)
    with pytest.raises(TypeError, match="test_size"):
        load_split(test_size=0.2)  # type: ignore[arg-type]


def test_augment_keeps_shape_and_identity_at_zero(split) -> None:
    images = split.train_images[:8]
    same = augment(images, torch.Generator().manual_seed(0), max_shift=0.0, max_rotation=0.0)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    varied = augment(images, torch.Generator().manual_seed(0))
    assert varied.shape == images.shape and not torch.allclose(varied, images)
    again = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(varied, again)


def test_epoch_batches_are_a_function_of_epoch(split) -> None:
    kwargs = {"batch_size": 100, "seed": 3, "max_shift": 1.0, "max_rotation": 10.0}
    images, labels = split.train_images[:250], split.train_labels[:250]
    first = epoch_batches(images, labels, 1, **kwargs)
    assert [len(y) for _, y in first] == [100, 100, 50]
    again = epoch_batches(images, labels, 1, **kwargs)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], epoch_batches(images, labels, 2, **kwargs)[0][0])


def test_shift_pixels_moves_content_and_fills_zeros() -> None:
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 1, 2] = 1.0
    moved = shift_pixels(image, dx=1, dy=-1)
    assert moved[0, 0, 0, 3] == 1.0 and moved.sum() == 1.0
    assert shift_pixels(image, dx=2, dy=0).sum() == 0.0  # pushed off the edge
    assert torch.equal(shift_pixels(image, 0, 0), image)
    with pytest.raises(ValueError, match="shift"):
        shift_pixels(image, 4, 0)


def test_predict_with_test_time_shifts(split) -> None:
    torch.manual_seed(0)
    model = ViT(TINY).train()
    images = split.test_images[:5]
    plain, tta = predict(model, images), predict(model, images, tta=True)
    assert plain.shape == tta.shape == (5, 10) and not torch.allclose(plain, tta)
    assert model.training  # restored
    with torch.no_grad():
        torch.testing.assert_close(plain, model.eval()(images).log_softmax(-1))


@pytest.mark.parametrize(
    ("patch_size", "patch_kernel", "tokens"), [(2, None, 16), (2, 3, 16), (4, None, 4), (1, 3, 64)]
)
def test_vit_matches_patches_by_hand_and_torch_encoder(
    patch_size: int, patch_kernel: int | None, tokens: int
) -> None:
    """Patch embedding = E · (the kernel×kernel window of the zero-padded image at each
    patch, flattened) + b, row-major over the grid; then [class] + patches + positions
    through torch's nn.TransformerEncoder (same weights), and the head on the [class] token."""
    config = ViTConfig(
        patch_size=patch_size, patch_kernel=patch_kernel, d_model=16, num_heads=2, num_layers=1,
        dim_feedforward=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViT(config).eval()
    torch.nn.init.normal_(model.class_token)  # not the zeros it starts from, so it counts
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    kernel, pad, grid = config.kernel, (config.kernel - patch_size + 1) // 2, 8 // patch_size
    padded = F.pad(images.double(), (pad, pad, pad, pad))
    windows = torch.stack(
        [
            padded[:, :, i * patch_size : i * patch_size + kernel,
                   j * patch_size : j * patch_size + kernel].flatten(1)
            for i in range(grid)
            for j in range(grid)
        ],
        dim=1,
    )  # fmt: skip
    embedding = model.patch_embedding
    patches = windows @ embedding.weight.double().flatten(1).T + embedding.bias.double()
    assert patches.shape == (3, tokens, 16)
    torch.testing.assert_close(model.patches(images).double(), patches, atol=1e-6, rtol=1e-6)

    theirs = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        ),
        1,
        norm=torch.nn.LayerNorm(16),
        enable_nested_tensor=False,
    ).eval()
    model.encoder.layers[0].load_state_dict(EncoderLayer.from_torch(theirs.layers[0]).state_dict())
    model.encoder.norm.load_state_dict(theirs.norm.state_dict())
    sequence = torch.cat([model.class_token.expand(3, 1, 16), patches.float()], dim=1)
    sequence = sequence + model.positions.embedding.weight[: tokens + 1]
    with torch.no_grad():
        expected = model.head(theirs(sequence)[:, 0])
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)


def test_vit_rejects_bad_input() -> None:
    model = ViT(TINY)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(TypeError, match="images"):
        model([[0.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config"):
        ViT({"d_model": 16})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 8, "patch_size": 3}, "patch_size"),
        ({"d_model": 30, "num_heads": 4}, "num_heads"),
        ({"patch_kernel": 1}, "patch_kernel"),
        ({"patch_size": 1, "patch_kernel": 2}, "patch_kernel"),
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "tanh"}, "activation"),
    ],
)
def test_vit_config_rejects_bad_values(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ViTConfig(**kwargs)


def test_tiny_vit_loss_falls(split) -> None:
    torch.manual_seed(0)
    model = ViT(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = split.train_images[:64], split.train_labels[:64]
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert accuracy(model, images, labels) > 0.3


def test_save_and_load_give_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ViTConfig(patch_kernel=3, d_model=16, num_heads=2, num_layers=2, dim_feedforward=32)
    model = ViT(config).eval()
    model.save_pretrained(tmp_path)
    loaded = ViT.from_pretrained(tmp_path)
    assert loaded.config == config
    images = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
