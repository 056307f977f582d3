"""ImageFolder data on a tiny fake tree of class folders: batches, layout errors, bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from zootrain.data.imagefolder import ImageFolderDataModule
from zootrain.errors import DatasetError

from .helpers import BLUE, RED, fast_dev_run, rgb, save_image


def make_imagefolder(root: Path, test: bool = False) -> Path:
    """train/{cat,dog}: 3 images each, 8x8 to 32x32, PNG and JPEG; val/ (and test/) 2 each."""
    for split, count in [("train", 3), ("val", 2)] + ([("test", 2)] if test else []):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                size = (8 + 12 * i, 32 - 8 * i)
                suffix = "png" if i % 2 else "jpg"
                save_image(root / split / name / f"{i}.{suffix}", size, RED if c else BLUE)
    return root


def test_imagefolder_batches(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data")
    datamodule = ImageFolderDataModule("classification", root, image_size=16, batch_size=4)
    assert datamodule.class_names == ["cat", "dog"] and datamodule.num_classes == 2
    datamodule.setup("fit")
    assert datamodule.test_split == "val"  # no test/ folder: tested on val
    assert [len(datamodule.splits[s]) for s in ("train", "val", "test")] == [6, 4, 4]
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    # eval: every pixel is the class colour
    images, labels = next(iter(datamodule.val_dataloader()))
    for image, label in zip(images, labels, strict=True):
        expected = torch.tensor(RED if label else BLUE).view(3, 1, 1) / 255
        assert torch.allclose(rgb(image), expected.expand_as(image), atol=0.03)

    with_test = ImageFolderDataModule("classification", make_imagefolder(tmp_path / "t", True))
    with_test.setup("test")
    assert with_test.test_split == "test" and len(with_test.splits["test"]) == 4


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    def error(root: Path) -> str:
        with pytest.raises(DatasetError) as info:
            ImageFolderDataModule("classification", root).setup()
        return str(info.value)

    missing = error(tmp_path / "nowhere")
    assert "nowhere is not a directory" in missing
    assert "train/<class>/<image>" in missing and "val/<class>/<image>" in missing
    assert "Traceback" not in missing

    flat = tmp_path / "flat"
    save_image(flat / "train" / "a.png", (8, 8))
    (flat / "val").mkdir()
    assert "flat/train has no class folders (images must be in train/<class>/)" in error(flat)

    root = make_imagefolder(tmp_path / "data")
    assert f"data.root points at a split: try data.root={root}" in error(root / "train")

    (root / "val" / "dog").rename(root / "val" / "doge")
    assert "missing in val/: ['dog']; missing in train/: ['doge']" in error(root)


def test_imagefolder_bad_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_imagefolder(tmp_path / "data")
    notes = root / "train" / "cat" / "notes.txt"
    notes.write_text("not an image")
    cut = root / "val" / "dog" / "cut.jpg"
    cut.write_bytes((root / "val" / "dog" / "0.jpg").read_bytes()[:20])  # header cut short
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored

    with pytest.raises(DatasetError) as info:
        ImageFolderDataModule("classification", root).setup()
    message = str(info.value)
    assert "2 file(s) under" in message and "data.skip_bad_files=true" in message
    assert f"{notes}: UnidentifiedImageError" in message and f"{cut}: " in message

    datamodule = ImageFolderDataModule("classification", root, skip_bad_files=True)
    with caplog.at_level(logging.WARNING, logger="zootrain.data.imagefolder"):
        datamodule.setup()
    assert "skipping 2 unreadable file(s)" in caplog.text and str(notes) in caplog.text
    assert [len(datamodule.splits[s]) for s in ("train", "val")] == [6, 4]

    # every image of a class unreadable: named, even when skipping
    for path in (root / "val" / "cat").iterdir():
        path.write_bytes(b"junk")
    with pytest.raises(
        DatasetError, match=r"data/val has no readable image for the classes \['cat'\]"
    ):
        ImageFolderDataModule("classification", root, skip_bad_files=True).setup()


@pytest.mark.slow
def test_fast_dev_run_on_imagefolder(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "data")
    metrics = fast_dev_run(
        tmp_path, "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.batch_size=4"
    )
    assert {"train/loss_epoch", "val/acc", "val/f1"} <= set(metrics)
