"""COCO detection data on a tiny fake copy: contiguous labels, crowd boxes, boxes that move with the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zootrain.data.coco import COCODetectionDataModule
from zootrain.errors import DatasetError

from .helpers import RED, dilate, fast_dev_run, interior, is_red, save_image

COCO_CATEGORIES = [  # ids with gaps, as in COCO, listed out of order
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def make_coco(root: Path) -> Path:
    """Per split: two images with red boxes (one also with a crowd region), one with none."""
    for split in ("train", "val"):
        images, annotations = [], []
        for i in range(3):
            name = f"{i:012d}.jpg"
            size = (48 + 8 * i, 40)
            box = (6 + 4 * i, 8, 30 + 4 * i, 32) if i < 2 else None
            save_image(
                root / f"{split}2017" / name,
                size,
                colour=RED if box else (20, 20, 20),  # the third image: nothing on it
                box=box,
                background=(20, 20, 20),
                exact=True,
            )
            images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
            if box is not None:
                x0, y0, x1, y1 = box
                bbox = [x0, y0, x1 - x0, y1 - y0]
                category = (1, 18)[i]
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                     "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, "segmentation": []}
                )  # fmt: skip
            if i == 1:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 90,
                     "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 1,
                     "segmentation": {"counts": [0, 16], "size": [40, size[0]]}}
                )  # fmt: skip
        folder = root / "annotations"
        folder.mkdir(parents=True, exist_ok=True)
        content = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
        (folder / f"instances_{split}2017.json").write_text(json.dumps(content))
    return root


def test_coco_detection_targets(tmp_path: Path) -> None:
    torch.manual_seed(0)
    root = make_coco(tmp_path)
    datamodule = COCODetectionDataModule("detection", root, image_size=32, batch_size=3)
    assert datamodule.class_names == ["person", "dog", "toothbrush"]  # by category id
    datamodule.setup("fit")
    assert datamodule.test_split == "val"
    images, targets = next(iter(datamodule.val_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 3
    for image, target in zip(images, targets, strict=True):
        assert image.dtype == torch.uint8 and max(image.shape[1:]) == 32
        assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
        assert target["labels"].dtype == torch.int64
    # contiguous labels (ids 1, 18 -> 0, 1), the crowd box dropped, the empty image kept
    assert [t["labels"].tolist() for t in targets] == [[0], [1], []]
    assert targets[2]["boxes"].shape == (0, 4)
    for _ in range(6):  # random scale, crop and flip: each box covers its object's pixels
        for image, target in zip(*next(iter(datamodule.train_dataloader())), strict=True):
            red = is_red(image)
            boxed = torch.zeros_like(red)
            for x0, y0, x1, y1 in target["boxes"].round().long().tolist():
                box = torch.zeros_like(red)
                box[y0:y1, x0:x1] = True
                assert red[interior(box)].all()  # the box is on the object ...
                boxed |= box
            # ... and the object is in a box (a sliver under 1 px wide loses its box)
            assert not (interior(red) & ~dilate(boxed)).any()


def test_coco_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        COCODetectionDataModule("detection", tmp_path / "coco", download=True).prepare_data()
    message = str(info.value)
    assert "torchvision cannot download it" in message and "cocodataset.org" in message
    assert "annotations/instances_train2017.json, instances_val2017.json" in message

    root = make_coco(tmp_path / "c")
    (root / "val2017" / "000000000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 3 files listed in .*instances_val2017.json"):
        COCODetectionDataModule("detection", root).setup()


@pytest.mark.slow
def test_fast_dev_run_of_fcos_on_coco(tmp_path: Path) -> None:
    """The detection head on the COCO data module (gapped ids, a crowd box, an empty image)."""
    root = make_coco(tmp_path / "data")
    metrics = fast_dev_run(
        tmp_path,
        "head=fcos",
        "head.model.fpn_channels=32",
        "data=coco",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=3",
    )
    assert {"train/loss_epoch", "val/map", "val/map_50"} <= set(metrics)
