"""COCO data on tiny fake copies: contiguous labels and back, crowd boxes, boxes and masks that
move with the pixels; a shapes split written in COCO's format, trained on and evaluated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from zootrain.data.coco import COCODetectionDataModule
from zootrain.data.shapes import SHAPES, ShapesDataset
from zootrain.errors import DatasetError
from zootrain.evaluate import evaluate
from zootrain.run import train

from ..test_detection_training import R_CNN_CHEAP as DETECTION_R_CNN_CHEAP
from .helpers import RED, config, dilate, fast_dev_run, interior, is_red, save_image

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
                polygon = [x0, y0, x1, y0, x1, y1, x0, y1]  # the red rectangle's outline
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                     "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
                     "segmentation": [polygon]}
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


def test_coco_instance_masks_move_with_the_pixels(tmp_path: Path) -> None:
    """Polygon masks decoded, crowd ones dropped with their boxes, cropped and flipped as the image."""
    torch.manual_seed(0)
    root = make_coco(tmp_path)
    datamodule = COCODetectionDataModule("instance_segmentation", root, image_size=32, batch_size=3)
    datamodule.setup("fit")
    images, targets = next(iter(datamodule.val_dataloader()))
    for image, target in zip(images, targets, strict=True):
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (
            len(target["labels"]),
            *image.shape[1:],
        )
        # the polygon is the red rectangle: its mask covers the red pixels, nothing far off
        red = is_red(image)
        covered = masks.sum(0) > 0
        assert not (interior(red) & ~covered).any() and not (covered & ~dilate(red)).any()
    assert targets[2]["masks"].shape == (0, *images[2].shape[1:])  # the empty image
    for _ in range(4):  # random scale, crop and flip
        for image, target in zip(*next(iter(datamodule.train_dataloader())), strict=True):
            red, covered = is_red(image), target["masks"].sum(0) > 0
            assert len(target["masks"]) == len(target["boxes"])
            assert not (interior(red) & ~covered).any() and not (covered & ~dilate(red)).any()


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


# Non-contiguous COCO category ids, not in the order of SHAPES: labels follow the ids.
CATEGORY_IDS = {"circle": 90, "square": 3, "triangle": 42, "star": 7, "ring": 11, "cross": 20}


def write_shapes_coco(root: Path, sizes: dict[str, int], image_size: int) -> dict[str, list]:
    """Shapes scenes as COCO 2017 on disk: <split>2017/*.png and annotations/instances_<split>2017.json
    with boxes (xywh) and one compressed-RLE mask per visible shape; the annotations by split."""
    categories = [{"id": i, "name": name} for name, i in CATEGORY_IDS.items()]
    written = {}
    for split, count in sizes.items():
        dataset = ShapesDataset(split, count, "instance_segmentation", image_size=image_size)
        images, annotations = [], []
        for index in range(count):
            image, target = dataset[index]  # (3, H, W) uint8
            name = f"{index:012d}.png"
            pixels = image.permute(1, 2, 0).numpy()
            (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / f"{split}2017" / name)
            images.append(
                {"id": index + 1, "file_name": name, "width": image_size, "height": image_size}
            )
            for box, label, mask in zip(
                target["boxes"].tolist(), target["labels"].tolist(), target["masks"], strict=True
            ):
                rle = coco_mask.encode(np.asfortranarray(mask.numpy()))
                rle["counts"] = rle["counts"].decode()  # bytes are not JSON
                x0, y0, x1, y1 = box
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": index + 1,
                     "category_id": CATEGORY_IDS[SHAPES[label]],
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()),
                     "iscrowd": 0, "segmentation": rle}
                )  # fmt: skip
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        content = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))
        written[split] = annotations
    return written


@pytest.fixture(scope="module")
def shapes_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list]]:
    root = tmp_path_factory.mktemp("shapes_coco")
    return root, write_shapes_coco(root, {"train": 16, "val": 8}, image_size=64)


def test_category_ids_map_to_contiguous_labels_and_back(
    shapes_coco: tuple[Path, dict[str, list]],
) -> None:
    root, written = shapes_coco
    datamodule = COCODetectionDataModule("instance_segmentation", root, image_size=64)
    ids = sorted(CATEGORY_IDS.values())
    assert datamodule.category_ids == ids == [3, 7, 11, 20, 42, 90]
    name_of = {i: name for name, i in CATEGORY_IDS.items()}
    assert datamodule.class_names == [name_of[i] for i in ids]  # square, star, ring, ...
    datamodule.setup("fit")
    val = datamodule.splits["val"]
    shapes = ShapesDataset("val", 8, "instance_segmentation", image_size=64)
    for index in range(len(val)):
        _, target = val[index]
        expected = shapes[index][1]
        annotations = [a for a in written["val"] if a["image_id"] == index + 1]
        # each label back to the file's category id, in the file's order; the shape's name
        assert [datamodule.category_ids[label] for label in target["labels"].tolist()] == [
            a["category_id"] for a in annotations
        ]
        assert [datamodule.class_names[label] for label in target["labels"].tolist()] == [
            SHAPES[label] for label in expected["labels"].tolist()
        ]
        # the RLE masks come back exactly (eval keeps 64 px images at their size)
        assert torch.equal(target["masks"], expected["masks"])
        assert torch.equal(target["boxes"], expected["boxes"])


# A few steps of each head on the COCO files, then eval.py on the best checkpoint.
COCO_RUN = [
    "data=coco",
    "data.image_size=64",
    "data.batch_size=8",
    "data.num_workers=0",
    "head.model.fpn_channels=32",
    "callbacks=none",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "test_after_fit=false",
    "pictures=false",
    "export_backbone=false",
]
R_CNN_CHEAP = [*DETECTION_R_CNN_CHEAP, "head.model.box_batch_size_per_image=32"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("head", "scores"),
    [
        ("fcos", ["map", "map_50"]),
        ("mask_rcnn", ["bbox_map", "bbox_map_50", "segm_map", "segm_map_50"]),
    ],
)
def test_train_and_evaluate_on_coco_files(
    head: str, scores: list[str], shapes_coco: tuple[Path, dict[str, list]], tmp_path: Path
) -> None:
    root, _ = shapes_coco
    overrides = [f"head={head}", f"data.root={root}", *COCO_RUN]
    if head == "mask_rcnn":
        overrides += R_CNN_CHEAP
    result = train(config(tmp_path, *overrides))
    assert {f"val/{name}" for name in scores} <= set(result.metrics)
    assert all(math.isfinite(result.metrics[f"val/{name}"]) for name in scores)
    eval_cfg = config(
        tmp_path / "eval",
        f"ckpt_path={result.best_model_path}",
        "trainer.accelerator=cpu",
        "pictures=true",
        name="eval",
    )
    evaluated = evaluate(eval_cfg)
    # the checkpoint's model and COCO data rebuilt from its config: the same scores
    assert evaluated.metrics[result.monitor] == pytest.approx(result.best_score, abs=1e-6)
    assert len(evaluated.pictures) == 2
