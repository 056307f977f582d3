"""zootrain/data/transforms.py: uint8 presets, and the device's normalisation of their batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from backbones import IMAGENET_MEAN, IMAGENET_STD
from zootrain.build import build_datamodule, build_module
from zootrain.data.transforms import (
    DeviceNormalize,
    classification_preset,
    collate_samples,
    stack_images,
)

from .helpers import config

OLD_NORMALISE = v2.Compose(
    [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
)


def test_device_normalize_is_v2s_to_dtype_and_normalize() -> None:
    """The same values as the workers' float pipeline gave (7e-7 apart measured: one rounding
    of (x / 255 - mean) / std against one multiply-add), for a batch, an image, a list."""
    images = torch.randint(0, 256, (4, 3, 17, 19), dtype=torch.uint8)
    normalize = DeviceNormalize(IMAGENET_MEAN, IMAGENET_STD)
    expected = OLD_NORMALISE(images)
    torch.testing.assert_close(normalize(images), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(images[1]), expected[1], atol=1e-6, rtol=0)
    listed = normalize([images[0], images[2, :, :5]])  # detection: images of any size
    torch.testing.assert_close(listed[1], expected[2, :, :5], atol=1e-6, rtol=0)
    last = images.contiguous(memory_format=torch.channels_last)
    assert normalize(last).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalize(last), normalize(images))  # its own path: the same values
    floats = torch.randn(2, 3, 4, 4)
    assert normalize(floats) is floats  # the model's input already
    torch.testing.assert_close(DeviceNormalize()(images), images.float() / 255, atol=1e-7, rtol=0)
    with pytest.raises(TypeError, match=r"must be uint8 .* or floating point, got torch.int64"):
        normalize(images.long())
    with pytest.raises(ValueError, match="give both mean and std"):
        DeviceNormalize(IMAGENET_MEAN)


def test_the_presets_keep_uint8() -> None:
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    for train in (True, False):
        out, label = classification_preset(train, 32)(image, 3)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32) and label == 3
        assert type(out) is torch.Tensor  # no tv_tensors leave the workers


def interleaved_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A (3, H, W) view of (H, W, 3) memory, as decode_jpeg and PIL's arrays give images."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return pixels.permute(2, 0, 1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_classification_presets_are_v2s_geometry(train: bool) -> None:
    """RandomResizedCrop + flip (train) and resize + center crop (eval), as v2 did them before:
    the same bytes and the same draws from torch's generator (its state after each call too),
    for up- and downscaled crops, planar and interleaved images, odd sizes."""
    if train:
        reference = v2.Compose(
            [v2.RandomResizedCrop(24, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )
    else:
        reference = v2.Compose([v2.Resize(round(24 / 0.8), antialias=True), v2.CenterCrop(24)])
    preset = classification_preset(train, 24, crop_scale=(0.2, 1.0), crop_pct=0.8)
    images = [
        interleaved_image(75, 100, seed=0),
        interleaved_image(13, 170, seed=1),  # a crop the ratio limits; upscaled
        interleaved_image(61, 47, seed=2).contiguous(),  # planar
        interleaved_image(24, 24, seed=3),
    ]
    for image in images:
        for seed in range(12):
            torch.manual_seed(seed)
            out, label = preset(image, 7)
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            expected = reference(image)
            assert torch.equal(out, expected) and label == 7
            assert torch.equal(state, torch.get_rng_state())


def test_stack_images_batches_interleaved_images_channels_last() -> None:
    """Images with their channels innermost (the presets' output) stack into a channels-last
    batch, planar ones into a planar batch, a mix into a planar one: the same values each way."""
    interleaved = [interleaved_image(5, 7, seed=s) for s in range(3)]
    planar = [image.contiguous() for image in interleaved]
    expected = torch.stack(planar)
    for images, channels_last in (
        (interleaved, True),
        (planar, False),
        ([*planar[:2], interleaved[2]], False),
    ):
        batch = stack_images(images)
        assert torch.equal(batch, expected)
        assert batch.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert batch.is_contiguous() is not channels_last
    images, labels = collate_samples([(image, i) for i, image in enumerate(interleaved)])
    assert torch.equal(images, expected) and torch.equal(labels, torch.tensor([0, 1, 2]))


def test_the_module_normalises_batches_after_the_transfer(tmp_path: Path) -> None:
    """Each task's batch: uint8 in, the model's float input out (channels_last where the run
    asks for it); what is not an (images, target) pair, like the summary's example, passes."""
    for head in ("classification", "fcos"):
        cfg = config(tmp_path, f"head={head}", "data.image_size=32", "data.num_train=8")
        datamodule = build_datamodule(cfg)
        module = build_module(cfg, datamodule)
        assert module.normalize.mean == datamodule.mean == IMAGENET_MEAN
        batch = next(iter(datamodule.train_dataloader()))
        images, target = module.on_after_batch_transfer(batch, 0)
        if head == "classification":
            assert batch[0].dtype == torch.uint8 and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(images, OLD_NORMALISE(batch[0]), atol=1e-6, rtol=0)
            assert target is batch[1]
        else:  # lists of images
            assert [i.dtype for i in images] == [torch.float32] * len(batch[0])
            torch.testing.assert_close(images[0], OLD_NORMALISE(batch[0][0]), atol=1e-6, rtol=0)
        example = module.task.example_input(datamodule.splits["val"][0][0])
        assert module.on_after_batch_transfer(example, 0) is example
