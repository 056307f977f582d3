"""zootrain/data/images.py: JPEGs by libjpeg-turbo with PIL's pixels, 16-bit PNGs scaled to 8 bits
in every reader, damaged files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import zootrain.data.images as images
from zootrain.data.imagefolder import ImageFolderDataModule
from zootrain.data.images import read_image
from zootrain.data.pet import OxfordPetDataModule
from zootrain.data.voc import VOCSegmentationDataModule
from zootrain.errors import DatasetError
from zootrain.report import user_errors

from .helpers import natural, save_image
from .test_pet import make_pet
from .test_voc import make_voc


def save_grey16(path: Path, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """A 16-bit greyscale PNG (whatever the suffix) spanning 0..65535; returns its values."""
    width, height = size
    values = (np.arange(width * height).reshape(height, width) * 1021 % 65536).astype(np.uint16)
    Image.fromarray(values).save(path, format="PNG")
    assert Image.open(path).mode == "I;16"
    return values


def hwc(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) uint8 tensor as PIL's (H, W, 3) array."""
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    return image.permute(1, 2, 0).numpy()


def test_16_bit_greyscale_keeps_its_high_byte(tmp_path: Path) -> None:
    values = save_grey16(tmp_path / "grey16.png")
    pixels = hwc(read_image(tmp_path / "grey16.png"))
    assert pixels.shape == (30, 40, 3) and pixels.dtype == np.uint8
    assert (pixels == (values >> 8)[..., None]).all()
    # PIL's own conversion clips at 255: nearly every pixel white
    assert (np.asarray(Image.open(tmp_path / "grey16.png").convert("RGB")) == 255).mean() > 0.99


def test_8_bit_images_are_unchanged(tmp_path: Path) -> None:
    save_image(tmp_path / "rgb.png", (40, 30), box=(5, 5, 20, 20))
    assert (
        hwc(read_image(tmp_path / "rgb.png")) == np.asarray(Image.open(tmp_path / "rgb.png"))
    ).all()


def first_train_sample(reader: str, root: Path) -> tuple[Dataset, Path]:
    """The raw (untransformed) training dataset of a tiny copy, and its first image's path."""
    if reader == "imagefolder":
        for split in ("train", "val"):
            for label in ("a", "b"):
                save_image(root / split / label / "0.jpg", (40, 30))
        datamodule = ImageFolderDataModule("classification", root)
        first = root / "train" / "a" / "0.jpg"
    elif reader == "pet":
        datamodule = OxfordPetDataModule("classification", make_pet(root), val_fraction=0)
        first = root / "oxford-iiit-pet" / "images" / "Abyssinian_1.jpg"
    else:
        datamodule = VOCSegmentationDataModule("segmentation", make_voc(root))
        first = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    datamodule.setup()
    return datamodule.splits["train"].dataset, first


@pytest.mark.parametrize("reader", ["imagefolder", "pet", "voc"])
def test_every_reader_scales_16_bit_pngs(reader: str, tmp_path: Path) -> None:
    dataset, first = first_train_sample(reader, tmp_path)
    values = save_grey16(first)
    image, _ = dataset[0]
    assert (hwc(image) == (values >> 8)[..., None]).all()


def test_16_bit_masks_keep_their_label_values(tmp_path: Path) -> None:
    dataset, first = first_train_sample("voc", tmp_path)
    mask_path = first.parents[1] / "SegmentationClass" / "2007_000001.png"
    labels = np.zeros((30, 40), dtype=np.uint16)
    labels[5:10, 5:10], labels[20:, :] = 15, 255
    Image.fromarray(labels).save(mask_path)
    _, mask = dataset[0]
    assert (mask.numpy() == labels).all()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The file fails when decoded (its header reads fine); in a worker, too, the user gets one
    line naming it."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    truncate(path)
    with pytest.raises(
        DatasetError, match=rf"cannot decode the image {path} \(OSError: image file is truncated"
    ):
        read_image(path)

    class Images(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> np.ndarray:
            return hwc(read_image(path))

    with pytest.raises(SystemExit), user_errors():
        next(iter(DataLoader(Images(), num_workers=1)))
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: cannot decode the image {path} (OSError: image file is truncated"
    )
    assert len(err.splitlines()) == 1 and "Traceback" not in err


decode = images.decode_jpeg  # the real one, while a test counts its calls


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("RGB", {}),  # 4:2:0 chroma, as cameras and ImageNet store them
        ("RGB", {"subsampling": 0}),  # 4:4:4
        ("RGB", {"progressive": True}),
        ("L", {}),  # greyscale: copied to three channels
        ("CMYK", {}),
    ],
)
def test_jpegs_decode_to_pils_pixels(
    mode: str, options: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libjpeg-turbo through torchvision gives PIL's pixels (0 levels apart with torchvision
    0.29's and Pillow 13's wheels; 1 allowed for builds that round the IDCT otherwise)."""
    path = tmp_path / "photo.png"  # a misleading suffix: JPEGs are found by their content
    Image.fromarray(natural(75, 100)).convert(mode).save(path, format="JPEG", quality=90, **options)
    decoded = []
    monkeypatch.setattr(images, "decode_jpeg", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    pixels = read_image(path)
    assert decoded, "not read by decode_jpeg"
    reference = np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(hwc(pixels).astype(int) - reference).max() <= 1


def test_other_formats_go_through_pil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "decode_jpeg", lambda *a, **k: pytest.fail("decoded as JPEG"))
    palette = Image.fromarray(natural(30, 40)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "palette.jpg", format="PNG")  # a PNG named .jpg
    assert (hwc(read_image(tmp_path / "palette.jpg")) == np.asarray(palette.convert("RGB"))).all()
    Image.fromarray(natural(30, 40)).save(tmp_path / "photo.webp", lossless=True)
    assert (hwc(read_image(tmp_path / "photo.webp")) == natural(30, 40)).all()
    with pytest.raises(DatasetError, match=r"cannot decode the image .*notes.jpg \(Unidentified"):
        (tmp_path / "notes.jpg").write_text("not an image")
        read_image(tmp_path / "notes.jpg")
    with pytest.raises(DatasetError, match=r"cannot read the image .*gone.jpg \(FileNotFound"):
        read_image(tmp_path / "gone.jpg")
