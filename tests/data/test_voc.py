"""PASCAL VOC segmentation data on a tiny fake VOCdevkit: masks, padding, layout errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from zootrain.data.voc import VOCSegmentationDataModule
from zootrain.errors import DatasetError
from zootrain.tasks import IGNORE_INDEX

from .helpers import interior, is_red, rgb, save_image, save_mask


def make_voc(root: Path) -> Path:
    """3 train + 2 val images, 40x30; a 'person' (15) square outlined with 255."""
    base = root / "VOCdevkit" / "VOC2012"
    ids = {
        "train": ["2007_000001", "2007_000002", "2007_000003"],
        "val": ["2008_000001", "2008_000002"],
    }
    for split, names in ids.items():
        for name in names:
            obj = (8, 6, 28, 24)
            save_image(base / "JPEGImages" / f"{name}.jpg", (40, 30), box=obj, exact=True)
            outline = (obj[0] - 1, obj[1] - 1, obj[2] + 1, obj[3] + 1)
            path = base / "SegmentationClass" / f"{name}.png"
            save_mask(path, (40, 30), {outline: 255, obj: 15}, fill=0)
            mask = Image.open(path).convert("P")  # VOC's masks are palette images
            mask.save(path)
        lists = base / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_voc_segmentation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    root = make_voc(tmp_path)
    datamodule = VOCSegmentationDataModule("segmentation", root, image_size=32, batch_size=3)
    assert datamodule.num_classes == 21 and datamodule.class_names[15] == "person"
    datamodule.setup("fit")
    assert datamodule.test_split == "val"
    for _ in range(4):
        images, masks = next(iter(datamodule.train_dataloader()))
        assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)
        assert set(masks.unique().tolist()) <= {0, 15, IGNORE_INDEX}
        for image, mask in zip(images, masks, strict=True):
            person, background, red = interior(mask == 15), interior(mask == 0), is_red(image)
            assert red[person].all() and not red[background].any()
            # crop padding (image smaller than the crop) is ignored, never background
            padded = (rgb(image) < 0.02).all(0)
            assert (mask[padded] == IGNORE_INDEX).all()
    images, masks = next(iter(datamodule.val_dataloader()))
    # eval: longer side 40 -> 32, so 30 -> 24 rows; rows 24.. are padding
    assert images.shape == (2, 3, 32, 32) and (masks[:, 24:] == IGNORE_INDEX).all()
    assert (masks[:, :24] != IGNORE_INDEX).float().mean() > 0.8


def test_voc_layout_errors(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    with pytest.raises(DatasetError, match=f"points inside the dataset: try data.root={root}"):
        VOCSegmentationDataModule("segmentation", root / "VOCdevkit" / "VOC2012").setup()
    (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 4 files listed in .*val.txt are missing"):
        VOCSegmentationDataModule("segmentation", root).setup()
