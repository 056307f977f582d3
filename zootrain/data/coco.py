"""COCO 2017 object detection and instance segmentation (Lin et al. 2014), read by
torchvision's CocoDetection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms.v2 import functional as F

from ..errors import DatasetError
from .base import DiskDataModule, Transformed, missing_files
from .images import read_image


class COCODetectionDataModule(DiskDataModule):
    """COCO 2017 object detection (Lin et al. 2014): 80 classes as contiguous labels 0-79.

    Targets are `{"boxes": float (N, 4) xyxy, "labels": int64 (N,)}`, as the shapes
    detection data gives, and for instance segmentation also `"masks"`, uint8 (N, H, W), one
    per box, from the annotations' polygons or RLE; crowd annotations are dropped (they mark
    groups, not objects) and images without boxes stay, with empty targets. Labels follow the
    category ids in ascending order (COCO's ids have gaps): `category_ids[label]` is the id
    of a label, and back. The test annotations are not public, so the test split is val2017
    (and says so). torchvision has no COCO download. Any annotation file in COCO's format
    works, laid out as COCO 2017 (see `layout`).

    Args: see `DiskDataModule`.
    """

    targets = ("boxes", "instances")
    title = "COCO 2017"
    downloadable = False
    get_it = (
        "Download train2017.zip, val2017.zip and annotations_trainval2017.zip from "
        "https://cocodataset.org/#download, unzip them into one folder and set data.root to it."
    )
    layout = """
train2017/<image>.jpg
val2017/<image>.jpg
annotations/instances_train2017.json, instances_val2017.json
"""

    def _annotations(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}2017.json"

    def _layout_problem(self) -> str | None:
        for split in ("train", "val"):
            if not (self.root / f"{split}2017").is_dir():
                return f"{self.root / f'{split}2017'} is missing"
            if not self._annotations(split).is_file():
                return f"{self._annotations(split)} is missing"
        return None

    def _read_classes(self) -> list[str]:
        # val's annotation file is small and lists the same categories as train's
        categories = self._categories(json.loads(self._annotations("val").read_text()))
        self._category_ids = [c["id"] for c in categories]
        return [c["name"] for c in categories]

    @property
    def category_ids(self) -> list[int]:
        """The COCO category id of each label, `category_ids[label]` (the file's ids, sorted)."""
        _ = self.class_names  # read with the class names, once
        return list(self._category_ids)

    def _categories(self, annotations: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(annotations["categories"], key=lambda c: c["id"])

    def _load(self, split: str) -> Dataset:
        dataset = _CocoDetection(self.root / f"{split}2017", str(self._annotations(split)))
        categories = self._categories(dataset.coco.dataset)
        if [c["name"] for c in categories] != self.class_names:
            raise DatasetError(
                f"{self._annotations(split)} lists other categories than "
                f"{self._annotations('val')}; both must have the same"
            )
        images = [Path(dataset.root) / image["file_name"] for image in dataset.coco.imgs.values()]
        problem = missing_files(images, self._annotations(split))
        if problem:
            raise DatasetError(f"{self.title}: {problem}.\n{self._expected()}")
        keys = ("boxes", "labels", "iscrowd")
        if self.task.target == "instances":  # decoded from polygons or RLE only when asked
            keys += ("masks",)
        wrapped = datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=keys)
        return _ContiguousLabels(
            wrapped, {c["id"]: i for i, c in enumerate(categories)}, masks="masks" in keys
        )

    def _build_splits(self) -> dict[str, Dataset]:
        train, val = self._load("train"), self._load("val")
        self.test_split = "val"
        return {
            "train": Transformed(train, self._transform(True)),
            "val": Transformed(val, self._transform(False)),
            "test": Transformed(val, self._transform(False)),
        }


class _ContiguousLabels(Dataset):
    """COCO samples with labels 0..K-1 (category ids have gaps), no crowd boxes, and empty
    (0, 4) boxes for images without annotations; with `masks`, a uint8 mask per box."""

    def __init__(self, dataset: Dataset, label_of: dict[int, int], masks: bool = False) -> None:
        self.dataset, self.label_of, self.masks = dataset, label_of, masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        image, target = self.dataset[index]
        image = F.to_image(image)
        height, width = image.shape[-2:]
        if "boxes" not in target:  # no annotation at all
            boxes = torch.zeros(0, 4)
            labels = torch.zeros(0, dtype=torch.int64)
            masks = torch.zeros(0, height, width, dtype=torch.uint8)
        else:
            keep = torch.tensor([not crowd for crowd in target["iscrowd"]], dtype=torch.bool)
            boxes = target["boxes"][keep]
            labels = torch.tensor(
                [self.label_of[int(c)] for c in target["labels"][keep]], dtype=torch.int64
            )
            masks = target["masks"][keep] if self.masks else None
        boxes = tv_tensors.BoundingBoxes(
            boxes.float(), format="XYXY", canvas_size=(height, width)
        )  # COCO files may hold integer boxes
        if not self.masks:
            return image, {"boxes": boxes, "labels": labels}
        # a Mask, so that the transforms move it with the pixels (nearest neighbours)
        masks = tv_tensors.Mask(masks.to(torch.uint8))
        return image, {"boxes": boxes, "labels": labels, "masks": masks}


class _CocoDetection(datasets.CocoDetection):
    """torchvision's COCO detection, its images read by `read_image` (damaged files named)."""

    def _load_image(self, id: int) -> torch.Tensor:
        return read_image(Path(self.root) / self.coco.loadImgs(id)[0]["file_name"])
