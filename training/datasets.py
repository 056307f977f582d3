"""Real datasets through `torchvision.datasets`: ImageFolder, CIFAR-10/100, Oxford-IIIT Pet, VOC, COCO.

A data module looks at its `root` the first time it is asked for its classes, which is before
the model is built: a missing or wrongly laid out dataset fails there with one message that
shows the expected layout and the `data.download=true` flag (torchvision's own download, on
local rank 0 only). Class names and counts are read from the data. Images, masks and boxes go
through one `torchvision.transforms.v2` preset per task (see `training.transforms`), normalised
with the statistics of the backbone's pretrained weights (`build_datamodule` passes them).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms.v2 import functional as F

from backbones import IMAGENET_MEAN, IMAGENET_STD

from .build import ConfigError
from .data import TaskDataModule
from .shapes import IGNORE_INDEX
from .transforms import classification_preset, dense_preset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# Oxford-IIIT Pet trimap values: 1 pet, 2 background, 3 the unlabelled border around the pet.
PET_TRIMAP = {1: 1, 2: 0, 3: IGNORE_INDEX}


class DatasetError(ConfigError):
    """A dataset root is missing, laid out wrongly or holds unreadable files; says what to do."""


class Transformed(Dataset):
    """Samples `indices` (all when None) of `dataset` through `transforms(image, target)`."""

    def __init__(
        self,
        dataset: Dataset,
        transforms: Callable[[Any, Any], tuple[Any, Any]],
        indices: Sequence[int] | None = None,
    ) -> None:
        self.dataset, self.transforms = dataset, transforms
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.transforms(*self.dataset[self.indices[index]])


class DiskDataModule(TaskDataModule):
    """Base of the data modules that read a dataset from `root`.

    Subclasses set `title`, `layout` (the expected tree under root) and implement
    `_layout_problem` (what is missing, or None), `_read_classes` and `_build_splits`
    (the raw train/val/test datasets and their transforms); `_download` where torchvision
    can fetch the dataset.

    Args:
        task: set from the head config; one of the subclass's `tasks`.
        root: the dataset folder (see each subclass's layout).
        download: fetch the dataset with torchvision when it is not under root.
        image_size: side of the square training crops (and of the eval images).
        batch_size, num_workers: DataLoader settings.
        mean, std: per-channel normalisation; `build_datamodule` passes the backbone's.
    """

    title = ""  # the dataset's name in messages
    layout = ""  # the expected tree under root; its first line is the top folder
    downloadable = True  # torchvision can fetch it
    get_it = "Set data.root to the folder that holds it."  # the advice when it cannot

    def __init__(
        self,
        task: str,
        root: str | Path,
        download: bool = False,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(task, batch_size, num_workers)
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.root = Path(root).expanduser()
        self.download = download
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.test_split = "test"  # the split that `test_dataloader` reads (some datasets: val)
        self._present = False
        self._classes: list[str] | None = None

    # ------------------------------------------------------------------ what subclasses give

    def _layout_problem(self) -> str | None:
        raise NotImplementedError

    def _read_classes(self) -> list[str]:
        raise NotImplementedError

    def _build_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            self._ensure_present()
            self._classes = self._read_classes()
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        self._ensure_present()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._ensure_present()
            _ = self.class_names  # class checks (ImageFolder's folders) before reading files
            self.splits = self._build_splits()
            if self.test_split != "test":
                log.info(
                    "%s has no labelled test split: the test split is %s",
                    self.title,
                    self.test_split,
                )

    def _ensure_present(self) -> None:
        if self._present:
            return
        problem = self._layout_problem()
        if problem is not None and self.download:
            if not self.downloadable:
                raise DatasetError(
                    f"{self.title}: torchvision cannot download it ({problem}).\n"
                    f"{self._expected()}\n{self.get_it}"
                )
            if _local_rank() != 0:
                raise DatasetError(
                    f"{self.title} is not under {self.root} yet and only local rank 0 "
                    "downloads; run once with data.download=true in a single process first"
                )
            self._download()
            problem = self._layout_problem()
        if problem is not None:
            advice = (
                "Set data.root to the folder that holds it, or data.download=true to fetch it "
                "with torchvision."
                if self.downloadable
                else self.get_it
            )
            raise DatasetError(
                f"no {self.title} at data.root: {problem}.\n{self._expected()}\n"
                f"{self._hint()}{advice}"
            )
        self._present = True

    def _expected(self) -> str:
        tree = "\n".join("  " + line for line in self.layout.strip().splitlines())
        return f"Expected under data.root={self.root}:\n{tree}"

    def _hint(self) -> str:
        """A root that points inside the dataset (a common slip) gets the right one named."""
        top = self.layout.strip().splitlines()[0].split()[0].rstrip("/")  # e.g. VOCdevkit/VOC2012
        if self.root.parts[-len(top.split("/")) :] == tuple(top.split("/")):
            return f"data.root points inside the dataset: try data.root={self.root.parents[top.count('/')]}. "
        return ""

    def _set_hold_out(self, val_fraction: float, seed: int) -> None:
        """For datasets without a validation split: the seeded part of train that validates."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction, self.seed = val_fraction, seed

    def _classification(self, train: bool, **options: Any) -> Callable:
        return classification_preset(train, self.image_size, self.mean, self.std, **options)

    def _dense(self, train: bool) -> Callable:
        return dense_preset(self.task, train, self.image_size, self.mean, self.std)


def _local_rank() -> int:
    """This process's rank on its node, from the launcher's environment (0 when alone)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _missing(paths: Sequence[Path], listed_in: Path) -> str | None:
    """None when every path exists, else how many are missing and the first few."""
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return None
    shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return f"{len(missing)} of the {len(paths)} files listed in {listed_in} are missing: {shown}"


# ---------------------------------------------------------------------------------- ImageFolder


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

    tasks = ("classification",)
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
        num_workers: int = 0,
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
            split: Transformed(dataset, self._classification(split == "train", **self.crop))
            for split, dataset in raw.items()
        }


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder on given classes and files (hidden folders are no classes)."""

    def __init__(self, root: Path, classes: list[str], files: set[str]) -> None:
        self._given_classes = classes
        super().__init__(str(root), is_valid_file=files.__contains__, allow_empty=True)

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


# ---------------------------------------------------------------------------------- CIFAR


class _CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10, checking that its files exist rather than their md5 on every load.

    (A download still verifies the archive's md5; an unreadable batch fails when it is read.)
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR-100, checking that its files exist (see `_CIFAR10`)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


class CIFAR10DataModule(DiskDataModule):
    """CIFAR-10 classification (Krizhevsky 2009), the python version of torchvision's CIFAR10.

    Args:
        val_fraction: part of the 50,000 training images held out (seeded) for validation;
            0 validates on the test set (and says so).
        seed: the hold-out seed.
        crop_scale, crop_pct: the classification preset (see `ImageFolderDataModule`).
        Others: see `DiskDataModule`.
    """

    tasks = ("classification",)
    title = "CIFAR-10"
    source = _CIFAR10
    layout = """
cifar-10-batches-py/
  data_batch_1 ... data_batch_5, test_batch, batches.meta
"""

    def __init__(
        self,
        task: str,
        root: str | Path,
        download: bool = False,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        crop_scale: Sequence[float] = (0.35, 1.0),
        crop_pct: float = 1.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(task, root, download, image_size, batch_size, num_workers, mean, std)
        self._set_hold_out(val_fraction, seed)
        self.crop = {"crop_scale": tuple(crop_scale), "crop_pct": crop_pct}

    def _files(self) -> list[Path]:
        folder = self.root / self.source.base_folder
        names = [name for name, _ in self.source.train_list + self.source.test_list]
        return [folder / name for name in [*names, self.source.meta["filename"]]]

    def _layout_problem(self) -> str | None:
        missing = [p for p in self._files() if not p.is_file()]
        return f"{missing[0]} is missing" if missing else None

    def _download(self) -> None:
        self.source(self.root, download=True)

    def _load(self, train: bool) -> datasets.CIFAR10:
        try:
            return self.source(self.root, train=train)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
            raise DatasetError(
                f"cannot read the {self.title} batches under {self.root / self.source.base_folder}"
                f" ({type(error).__name__}: {error}); delete the folder and set data.download=true"
            ) from None

    def _read_classes(self) -> list[str]:
        path = self.root / self.source.base_folder / self.source.meta["filename"]
        try:
            with open(path, "rb") as file:
                return list(pickle.load(file, encoding="latin1")[self.source.meta["key"]])
        except (pickle.UnpicklingError, EOFError, KeyError) as error:
            raise DatasetError(f"cannot read the class names from {path} ({error!r})") from None

    def _build_splits(self) -> dict[str, Dataset]:
        train, test = self._load(train=True), self._load(train=False)
        return _train_val_test(self, train, test)


def _train_val_test(
    module: CIFAR10DataModule | OxfordPetDataModule, train: Dataset, test: Dataset
) -> dict[str, Dataset]:
    """Splits of a dataset that has only train and test: val is a seeded random
    `module.val_fraction` of train, or (with 0) the test split."""
    if module.task == "classification":
        train_tf = module._classification(True, **module.crop)
        eval_tf = module._classification(False, **module.crop)
    else:
        train_tf, eval_tf = module._dense(True), module._dense(False)
    if module.val_fraction == 0:
        log.info("%s: val_fraction=0, validating on the test split", module.title)
        return {
            "train": Transformed(train, train_tf),
            "val": Transformed(test, eval_tf),
            "test": Transformed(test, eval_tf),
        }
    generator = torch.Generator().manual_seed(module.seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    count = max(1, round(module.val_fraction * len(train)))
    kept, held = sorted(order[count:]), sorted(order[:count])
    return {
        "train": Transformed(train, train_tf, kept),
        "val": Transformed(train, eval_tf, held),
        "test": Transformed(test, eval_tf),
    }


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 classification, 100 fine classes (Krizhevsky 2009); see `CIFAR10DataModule`."""

    title = "CIFAR-100"
    source = _CIFAR100
    layout = """
cifar-100-python/
  train, test, meta
"""


# ---------------------------------------------------------------------------------- Oxford Pet


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

    tasks = ("classification", "segmentation")
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
        num_workers: int = 0,
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
        if self.task == "segmentation":
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
        if self.task == "segmentation":
            files += [base / "annotations" / "trimaps" / f"{i}.png" for i in ids]
        problem = _missing(files, listed)
        if problem:
            raise DatasetError(f"{self.title}: {problem}.\n{self._expected()}")
        target = "segmentation" if self.task == "segmentation" else "category"
        return datasets.OxfordIIITPet(self.root, split, target_types=target)

    def _read_classes(self) -> list[str]:
        if self.task == "segmentation":
            return ["background", "pet"]
        return list(self._load("trainval").classes)

    def _build_splits(self) -> dict[str, Dataset]:
        trainval, test = self._load("trainval"), self._load("test")
        if self.task == "segmentation":
            trainval, test = _AsMasks(trainval, PET_TRIMAP), _AsMasks(test, PET_TRIMAP)
        return _train_val_test(self, trainval, test)


class _AsMasks(Dataset):
    """(PIL image, PIL class map) samples as (tv Image, tv Mask), values mapped by `lookup`."""

    def __init__(self, dataset: Dataset, lookup: dict[int, int] | None = None) -> None:
        self.dataset = dataset
        self.table = None
        if lookup is not None:
            self.table = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
            for value, label in lookup.items():
                self.table[value] = label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, mask = self.dataset[index]
        mask = torch.from_numpy(np.array(mask, dtype=np.uint8))  # (H, W); palette indices
        if self.table is not None:
            mask = self.table[mask.long()]
        return F.to_image(image), tv_tensors.Mask(mask)


# ---------------------------------------------------------------------------------- VOC


class VOCSegmentationDataModule(DiskDataModule):
    """PASCAL VOC 2012 semantic segmentation (Everingham et al. 2010): 20 classes + background.

    Pixels on object outlines (255 in the masks) are ignored. VOC's test labels are not
    public, so the test split is val (and says so).

    Args: see `DiskDataModule`.
    """

    tasks = ("segmentation",)
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

    def _load(self, split: str) -> datasets.VOCSegmentation:
        dataset = datasets.VOCSegmentation(self.root, year="2012", image_set=split)
        listed = self._base() / "ImageSets" / "Segmentation" / f"{split}.txt"
        problem = _missing([Path(p) for p in dataset.images + dataset.targets], listed)
        if problem:
            raise DatasetError(f"{self.title}: {problem}.\n{self._expected()}")
        return dataset

    def _build_splits(self) -> dict[str, Dataset]:
        train, val = _AsMasks(self._load("train")), _AsMasks(self._load("val"))
        self.test_split = "val"
        return {
            "train": Transformed(train, self._dense(True)),
            "val": Transformed(val, self._dense(False)),
            "test": Transformed(val, self._dense(False)),
        }


# ---------------------------------------------------------------------------------- COCO


class COCODetectionDataModule(DiskDataModule):
    """COCO 2017 object detection (Lin et al. 2014): 80 classes as contiguous labels 0-79.

    Targets are `{"boxes": float (N, 4) xyxy, "labels": int64 (N,)}`, as the shapes
    detection data gives; crowd annotations are dropped (they mark groups, not objects) and
    images without boxes stay, with empty targets. The test annotations are not public, so
    the test split is val2017 (and says so). torchvision has no COCO download.

    Args: see `DiskDataModule`.
    """

    tasks = ("detection",)
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
        return [c["name"] for c in categories]

    def _categories(self, annotations: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(annotations["categories"], key=lambda c: c["id"])

    def _load(self, split: str) -> Dataset:
        dataset = datasets.CocoDetection(self.root / f"{split}2017", str(self._annotations(split)))
        categories = self._categories(dataset.coco.dataset)
        if [c["name"] for c in categories] != self.class_names:
            raise DatasetError(
                f"{self._annotations(split)} lists other categories than "
                f"{self._annotations('val')}; both must have the same"
            )
        images = [Path(dataset.root) / image["file_name"] for image in dataset.coco.imgs.values()]
        problem = _missing(images, self._annotations(split))
        if problem:
            raise DatasetError(f"{self.title}: {problem}.\n{self._expected()}")
        wrapped = datasets.wrap_dataset_for_transforms_v2(
            dataset, target_keys=("boxes", "labels", "iscrowd")
        )
        return _ContiguousLabels(wrapped, {c["id"]: i for i, c in enumerate(categories)})

    def _build_splits(self) -> dict[str, Dataset]:
        train, val = self._load("train"), self._load("val")
        self.test_split = "val"
        return {
            "train": Transformed(train, self._dense(True)),
            "val": Transformed(val, self._dense(False)),
            "test": Transformed(val, self._dense(False)),
        }


class _ContiguousLabels(Dataset):
    """COCO samples with labels 0..K-1 (category ids have gaps), no crowd boxes, and empty
    (0, 4) boxes for images without annotations."""

    def __init__(self, dataset: Dataset, label_of: dict[int, int]) -> None:
        self.dataset, self.label_of = dataset, label_of

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        image, target = self.dataset[index]
        image = F.to_image(image)
        height, width = image.shape[-2:]
        if "boxes" not in target:  # no annotation at all
            boxes = torch.zeros(0, 4)
            labels = torch.zeros(0, dtype=torch.int64)
        else:
            keep = torch.tensor([not crowd for crowd in target["iscrowd"]], dtype=torch.bool)
            boxes = target["boxes"][keep]
            labels = torch.tensor(
                [self.label_of[int(c)] for c in target["labels"][keep]], dtype=torch.int64
            )
        boxes = tv_tensors.BoundingBoxes(
            boxes.float(), format="XYXY", canvas_size=(height, width)
        )  # COCO files may hold integer boxes
        return image, {"boxes": boxes, "labels": labels}
