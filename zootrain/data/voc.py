"""PASCAL VOC 2012 semantic segmentation (Everingham et al. 2010), read by torchvision."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from ..errors import DatasetError
from .base import AsMasks, DiskDataModule, Transformed, missing_files
from .images import open_image, read_image

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class VOCSegmentationDataModule(DiskDataModule):
    """PASCAL VOC 2012 semantic segmentation (Everingham et al. 2010): 20 classes + background.

    Pixels on object outlines (255 in the masks) are ignored. VOC's test labels are not
    public, so the test split is val (and says so).

    Args: see `DiskDataModule`.
    """

    targets = ("mask",)
    title = "PASCAL VOC 2012"
    layout = """
VOCdevkit/VOC2012/
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png              palette PNGs: 0-20 classes, 255 outlines
  ImageSets/Segmentation/train.txt, val.txt   one <id> a line
"""

    def _base(self) -> Path:
        return self.root / "VOCdevkit" / "VOC2012"

    def _layout_problem(self) -> str | None:
        base = self._base()
        for folder in ("JPEGImages", "SegmentationClass"):
            if not (base / folder).is_dir():
                return f"{base / folder} is missing"
        for split in ("train", "val"):
            if not (base / "ImageSets" / "Segmentation" / f"{split}.txt").is_file():
                return f"{base}/ImageSets/Segmentation/{split}.txt is missing"
        return None

    def _download(self) -> None:
        datasets.VOCSegmentation(self.root, year="2012", image_set="train", download=True)

    def _read_classes(self) -> list[str]:
        return list(VOC_CLASSES)

    def _load(self, split: str) -> _VOCSegmentation:
        dataset = _VOCSegmentation(self.root, year="2012", image_set=split)
        listed = self._base() / "ImageSets" / "Segmentation" / f"{split}.txt"
        problem = missing_files([Path(p) for p in dataset.images + dataset.targets], listed)
        if problem:
            raise DatasetError(f"{self.title}: {problem}.\n{self._expected()}")
        return dataset

    def _build_splits(self) -> dict[str, Dataset]:
        train, val = AsMasks(self._load("train")), AsMasks(self._load("val"))
        self.test_split = "val"
        return {
            "train": Transformed(train, self._transform(True)),
            "val": Transformed(val, self._transform(False)),
            "test": Transformed(val, self._transform(False)),
        }


class _VOCSegmentation(datasets.VOCSegmentation):
    """torchvision's VOC segmentation, its images read by `read_image` (16-bit PNGs scaled,
    damaged files named); the palette masks as stored."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Image.Image]:
        return read_image(self.images[index]), open_image(self.masks[index])
