"""Oxford-IIIT Pet (Parkhi et al. 2012): 37 breeds, or pet / background segmentation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets

from backbones import IMAGENET_MEAN, IMAGENET_STD

from ..errors import DatasetError
from .base import AsMasks, DiskDataModule, missing_files
from .images import open_image, read_image
from .transforms import IGNORE_INDEX

# Trimap values: 1 pet, 2 background, 3 the unlabelled border around the pet.
PET_TRIMAP = {1: 1, 2: 0, 3: IGNORE_INDEX}


class OxfordPetDataModule(DiskDataModule):
    """Oxford-IIIT Pet (Parkhi et al. 2012): 37 breeds, or pet / background segmentation.

    Classification predicts the breed. Segmentation uses the trimaps as two classes,
    background (0) and pet (1); the trimaps' third value, the thin unlabelled border around
    each pet, is ignored (IGNORE_INDEX), as the annotators left it undecided.

    Args:
        val_fraction: part of the trainval images held out (seeded) for validation; 0
            validates on the test split (and says so).
        seed: the hold-out seed.
        crop_scale, crop_pct: the classification preset (see `ImageFolderDataModule`).
        Others: see `DiskDataModule`.
    """

    targets = ("label", "mask")
    title = "Oxford-IIIT Pet"
    layout = """
oxford-iiit-pet/
  images/<Breed_name>_<n>.jpg
  annotations/trainval.txt, test.txt   lines "<image> <breed 1-37> <species> <breed id>"
  annotations/trimaps/<image>.png      (segmentation)
"""

    def __init__(
        self,
        task: str,
        root: str | Path,
        download: bool = False,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        val_fraction: float = 0.1,
        seed: int = 0,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(task, root, download, image_size, batch_size, num_workers, mean, std)
        self._set_hold_out(val_fraction, seed)
        self.crop = {"crop_scale": tuple(crop_scale), "crop_pct": crop_pct}

    def _layout_problem(self) -> str | None:
        base = self.root / "oxford-iiit-pet"
        needed = [base / "images", base / "annotations"]
        if self.task.target == "mask":
            needed.append(base / "annotations" / "trimaps")
        for folder in needed:
            if not folder.is_dir():
                return f"{folder} is missing"
        for split in ("trainval", "test"):
            if not (base / "annotations" / f"{split}.txt").is_file():
                return f"{base / 'annotations' / split}.txt is missing"
        return None

    def _download(self) -> None:
        datasets.OxfordIIITPet(self.root, download=True)

    def _load(self, split: str) -> datasets.OxfordIIITPet:
        base = self.root / "oxford-iiit-pet"
        listed = base / "annotations" / f"{split}.txt"
        ids = [line.split()[0] for line in listed.read_text().splitlines() if line.strip()]
        files = [base / "images" / f"{i}.jpg" for i in ids]
        if self.task.target == "mask":
            files += [base / "annotations" / "trimaps" / f"{i}.png" for i in ids]
        problem = missing_files(files, listed)
        if problem:
            raise DatasetError(f"{self.title}: {problem}.\n{self._expected()}")
        target = "segmentation" if self.task.target == "mask" else "category"
        return _OxfordIIITPet(self.root, split, target_types=target)

    def _read_classes(self) -> list[str]:
        if self.task.target == "mask":
            return ["background", "pet"]
        return list(self._load("trainval").classes)

    def _build_splits(self) -> dict[str, Dataset]:
        trainval, test = self._load("trainval"), self._load("test")
        if self.task.target == "mask":
            trainval, test = AsMasks(trainval, PET_TRIMAP), AsMasks(test, PET_TRIMAP)
        return self._hold_out_splits(trainval, test)


class _OxfordIIITPet(datasets.OxfordIIITPet):
    """torchvision's Pet, its images read by `read_image` (16-bit PNGs scaled, damaged files
    named); one target type, as the data module asks for."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        # torchvision keeps the file lists and labels in these (private) attributes
        if self._target_types == ["segmentation"]:
            target = open_image(self._segs[index])
        else:
            target = self._labels[index]
        return read_image(self._images[index]), target
