"""Classification from a folder of class sub-folders per split (torchvision's ImageFolder)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from backbones import IMAGENET_MEAN, IMAGENET_STD

from ..errors import DatasetError
from .base import DiskDataModule, Transformed
from .images import read_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class ImageFolderDataModule(DiskDataModule):
    """Classification from a folder of class sub-folders per split (torchvision's ImageFolder).

    Args:
        root: holds train/<class>/*, val/<class>/* and optionally test/<class>/* (without
            test/ the test split is val/). Class names are the train/ folder names; val/
            (and test/) must have the same ones. Hidden files and folders are ignored.
        skip_bad_files: files that are not readable images (checked from their header when
            the data is set up) fail the run, listed by path; with True they are skipped
            with a warning that lists them.
        crop_scale: area range of the training RandomResizedCrop.
        crop_pct: eval images are resized to image_size / crop_pct, then center-cropped.
        Others: see `DiskDataModule`.
    """

    targets = ("label",)
    title = "ImageFolder dataset"
    downloadable = False
    get_it = "Set data.root to a folder laid out like this."
    layout = """
<root>/
  train/<class>/<image>   e.g. train/daisy/0001.jpg, one folder per class
  val/<class>/<image>     the same class folders as train/
  test/<class>/<image>    optional; without it the test split is val/
"""

    def __init__(
        self,
        task: str,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        skip_bad_files: bool = False,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(
            task, root, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
            mean=mean, std=std,
        )  # fmt: skip
        self.skip_bad_files = skip_bad_files
        self.crop = {"crop_scale": tuple(crop_scale), "crop_pct": crop_pct}

    def _layout_problem(self) -> str | None:
        if not self.root.is_dir():
            return f"{self.root} is not a directory"
        for split in ("train", "val"):
            folder = self.root / split
            if not folder.is_dir():
                return f"{self.root} has no {split}/ folder"
            if not _class_folders(folder):
                return f"{folder} has no class folders (images must be in {split}/<class>/)"
        return None

    def _hint(self) -> str:
        if self.root.name in SPLITS:
            return f"data.root points at a split: try data.root={self.root.parent}. "
        return ""

    def _split_names(self) -> list[str]:
        return [s for s in SPLITS if s != "test" or (self.root / "test").is_dir()]

    def _read_classes(self) -> list[str]:
        classes = {split: _class_folders(self.root / split) for split in self._split_names()}
        for split, names in classes.items():
            if names != classes["train"]:
                only_train = sorted(set(classes["train"]) - set(names))
                only_here = sorted(set(names) - set(classes["train"]))
                raise DatasetError(
                    f"the class folders of {self.root}/train and {split}/ differ: missing in "
                    f"{split}/: {only_train or 'none'}; missing in train/: {only_here or 'none'}. "
                    "Every split needs the same class folders."
                )
        return classes["train"]

    def _build_splits(self) -> dict[str, Dataset]:
        scanned = {split: _scan(self.root / split) for split in self._split_names()}
        bad = [item for _, problems in scanned.values() for item in problems]
        if bad:
            listing = "\n".join(f"  {path}: {why}" for path, why in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            if not self.skip_bad_files:
                raise DatasetError(
                    f"{len(bad)} file(s) under {self.root} are not readable images:\n"
                    f"{listing}{more}\nRemove or replace them, or set data.skip_bad_files=true "
                    "to skip them."
                )
            log.warning("skipping %d unreadable file(s):\n%s%s", len(bad), listing, more)
        classes = self.class_names
        raw = {}
        for split, (good, _) in scanned.items():
            raw[split] = _ImageFolder(self.root / split, classes, good)
            empty = sorted(set(classes) - {classes[t] for t in raw[split].targets})
            if empty:
                raise DatasetError(
                    f"{self.root}/{split} has no readable image for the classes {empty}"
                )
        if "test" not in raw:
            raw["test"], self.test_split = raw["val"], "val"
        return {
            split: Transformed(dataset, self._transform(split == "train", **self.crop))
            for split, dataset in raw.items()
        }


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder on given classes and files (hidden folders are no classes),
    read by `read_image` (16-bit PNGs scaled, an undecodable file named)."""

    def __init__(self, root: Path, classes: list[str], files: set[str]) -> None:
        self._given_classes = classes
        super().__init__(
            str(root), loader=read_image, is_valid_file=files.__contains__, allow_empty=True
        )

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """(readable image paths, [(path, why not)]) of the visible files under folder's classes.

    Only each header is read (PIL's lazy open: format and size, no pixel decoding), so the
    check costs one small read per file; threads hide file-system latency.
    """
    paths = []
    for class_folder in _class_folders(folder):
        for directory, dirs, names in os.walk(folder / class_folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(directory, n) for n in sorted(names) if not n.startswith(".")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = list(pool.map(_image_problem, paths))
    good = {p for p, why in zip(paths, problems, strict=True) if why is None}
    bad = [(p, why) for p, why in zip(paths, problems, strict=True) if why is not None]
    return good, bad


def _image_problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # PIL raises many types for bad files; all mean "unreadable"
        return f"{type(error).__name__}: {error}"
    if width == 0 or height == 0:
        return f"empty image ({width}x{height})"
    return None
