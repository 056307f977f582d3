"""CIFAR-10 and CIFAR-100 classification (Krizhevsky 2009), the python version torchvision reads."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets

from backbones import IMAGENET_MEAN, IMAGENET_STD

from ..errors import DatasetError
from .base import DiskDataModule


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
        num_workers: int | str = "auto",
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
        return self._hold_out_splits(train, test)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 classification, 100 fine classes (Krizhevsky 2009); see `CIFAR10DataModule`."""

    title = "CIFAR-100"
    source = _CIFAR100
    layout = """
cifar-100-python/
  train, test, meta
"""
